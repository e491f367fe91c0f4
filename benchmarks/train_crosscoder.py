"""Crosscoder training quality on real activations: held-out FVU, L0 and dead fraction after a fixed budget.

The pair is two adjacent residual streams of the default model (Gemma 3 270M, blocks.5 and blocks.6
resid_post) on the same tokens: real, offline, and different enough that a crosscoder must model both. The
setting is tutorial 03's CI size (BatchTopK, 1,024 latents, k = 32, 600 steps of 512 tokens, lr 2e-3).
Compare trainers by running this script on each (e.g. before and after a change) with the same flags.

    .venv/bin/python benchmarks/train_crosscoder.py            # ~5 min on 2 cores
    .venv/bin/python benchmarks/train_crosscoder.py --steps 100
"""

from __future__ import annotations

import argparse
import time

import torch

from toolkit.config import CrosscoderConfig, CrosscoderTraining
from toolkit.crosscoder import PairedActivations, evaluate_crosscoder, split_paired
from toolkit.data import load_texts, token_contexts
from toolkit.models import load_model
from toolkit.tracing import iter_capture
from toolkit.training import train_crosscoder

SITES = ("blocks.5.resid_post", "blocks.6.resid_post")


def paired(n_contexts: int, ctx_len: int) -> PairedActivations:
    model = load_model("default")
    contexts = token_contexts(model.tokenizer, load_texts("default"), ctx_len, n_contexts=n_contexts, seed=0)
    keep = contexts != model.bos_token_id
    parts = []
    with torch.no_grad():
        for i, acts in iter_capture(model, contexts, list(SITES), batch_size=16, progress=False):
            m = keep[i:i + acts[SITES[0]].shape[0]]
            parts.append(torch.stack([acts[s][m].float() for s in SITES], dim=1))
    rows, pos = keep.nonzero(as_tuple=True)
    return PairedActivations(torch.cat(parts), None, None, contexts, torch.stack([rows, pos], dim=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, default=256)
    p.add_argument("--ctx-len", type=int, default=64)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    t0 = time.perf_counter()
    train, held = split_paired(paired(a.contexts, a.ctx_len), (0.8, 0.2))
    setup = time.perf_counter() - t0
    cfg = CrosscoderConfig(d_in=train.d, d_sae=a.width, architecture="batchtopk", k=a.k)
    steps = "total_steps" if "total_steps" in CrosscoderTraining.__dataclass_fields__ else "steps"
    training = CrosscoderTraining(**{steps: a.steps, "batch_size": a.batch, "lr": a.lr, "seed": a.seed})
    t1 = time.perf_counter()
    run = train_crosscoder(cfg, train, training, progress=False)
    seconds = time.perf_counter() - t1
    stats = evaluate_crosscoder(run.crosscoder, held)
    print(f"# {len(train):,} train / {len(held):,} held-out token pairs of {SITES}; setup {setup:.0f} s")
    print(f"held-out FVU {stats['fvu']:.4f} (first {stats['fvu_base']:.4f}, second {stats['fvu_ft']:.4f}), "
          f"L0 {stats['l0']:.1f}, dead fraction {stats['dead_fraction']:.4f}; training {seconds:.0f} s")


if __name__ == "__main__":
    main()
