"""SAE training side by side: this toolkit vs SAELens vs dictionary_learning, same activations, same budget.

Default model (Gemma 3 270M), layer 6 residual stream, width 4096, L0 ≈ 50 (k = 50 for TopK/BatchTopK, target
L0 = 50 for JumpReLU), the same token budget, batch size, learning rate and batch order for every trainer.
Each peer runs in its own venv (benchmarks/train_peers.sh) through benchmarks/train_sae_peer.py; every trained
SAE is then loaded with toolkit.sae's format loaders and evaluated the same way on held-out tokens (FVU and L0 of
plain inference). tokens/s is the trainer's wall time over the training tokens, initialization included.

    bash benchmarks/train_peers.sh                     # once: peer venvs under benchmarks/.peers/
    .venv/bin/python benchmarks/train_sae.py           # default: 100 steps of 1,024 tokens (~10 min on 2 cores)
    .venv/bin/python benchmarks/train_sae.py --quick   # smoke run (width 1024, 20 steps)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from toolkit.config import SAEConfig, TrainConfig
from toolkit.data import load_texts, token_contexts
from toolkit.models import load_model
from toolkit.sae import SAE
from toolkit.tracing import iter_capture
from toolkit.training.sae_trainer import train_sae
from toolkit.training.zoo import CorpusSpec, corpus_activations

HERE = Path(__file__).resolve().parent
PEERS = {"saelens": HERE / ".peers" / "venv" / "bin" / "python",
         "dictionary_learning": HERE / ".peers" / "dl-venv" / "bin" / "python"}
SITE = "blocks.6.resid_post"


def batches(data: np.ndarray, batch: int, seed: int, start: int = 0) -> Iterator[torch.Tensor]:
    """Epoch e: np.random.default_rng(seed + e).permutation(n) cut into batches (same as train_sae_peer.py)."""
    n, i = data.shape[0], 0
    per_epoch = n // batch
    epoch = 0
    while True:
        perm = np.random.default_rng(seed + epoch).permutation(n)
        for b in range(per_epoch):
            if i >= start:
                yield torch.from_numpy(np.ascontiguousarray(data[np.sort(perm[b * batch:(b + 1) * batch])]))
            i += 1
        epoch += 1


def our_config(arch: str, a: argparse.Namespace) -> TrainConfig:
    sae = SAEConfig(640, a.width, arch, k=a.k if arch != "jumprelu" else None, site=SITE, model="default")
    kw = dict(lr=a.lr, batch_size=a.batch, total_steps=a.steps, warmup_steps=a.steps // 20, log_every=10,
              dead_after_tokens=50 * a.batch, seed=a.seed)
    if arch == "jumprelu":  # the recipe of notebooks/02_train_sae.ipynb for short runs
        kw.update(target_l0=float(a.k), l0_coefficient=0.3, sparsity_warmup_steps=a.steps // 10,
                  threshold_lr_scale=15.0, bandwidth=0.1, threshold_control_rate=0.05)
    return TrainConfig(sae=sae, **kw)


def evaluate(sae: SAE, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = sae(x)
    fvu = float((x - out.reconstruction).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return fvu, float((out.codes != 0).sum(-1).float().mean())


def run_peer(lib: str, arch: str, a: argparse.Namespace, data_file: Path,
             out: Path) -> tuple[SAE, float, float, float] | str:
    py = PEERS[lib]
    if not py.exists():
        return f"no venv at {py}; run bash benchmarks/train_peers.sh"
    cmd = [str(py), str(HERE / "train_sae_peer.py"), "--lib", lib, "--arch", arch, "--data", str(data_file),
           "--eval", str(data_file.with_name("test.npy")),
           "--out", str(out), "--width", str(a.width), "--k", str(a.k), "--steps", str(a.steps),
           "--batch", str(a.batch), "--lr", str(a.lr), "--seed", str(a.seed), "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or proc.stdout[-300:]}"
    info = json.loads(lines[-1][len("RESULT "):])
    sae = SAE.from_saelens(out) if lib == "saelens" else SAE.from_dictionary_learning(out)
    return sae, info["tokens"] / info["seconds"], info["own_fvu"], info["own_l0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: width 1024, 20 steps of 512 tokens")
    p.add_argument("--archs", default="jumprelu,topk,batchtopk")
    p.add_argument("--libs", default="saelens,dictionary_learning")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--contexts", type=int, default=512, help="cached contexts of 128 tokens (tutorials share 512)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for every trainer (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.quick:
        a.width, a.steps, a.batch = 1024, 20, 512
    if a.threads:
        torch.set_num_threads(a.threads)
    archs, libs = a.archs.split(","), [x for x in a.libs.split(",") if x]

    t0 = time.perf_counter()
    model = load_model("default")
    corpus = CorpusSpec(n_contexts=a.contexts)
    cache = corpus_activations(model, SITE, corpus)
    held = token_contexts(model.tokenizer, load_texts("default"), corpus.ctx_len, n_contexts=a.contexts + 16)[-16:]
    with torch.no_grad():
        x_test = torch.cat([acts[SITE][:, 1:].reshape(-1, 640).float()
                            for _, acts in iter_capture(model, held, SITE, progress=False)])
    del model
    data = torch.cat([cache.shard(i)[SITE].float() for i in range(len(cache))]).numpy()
    print(f"# {data.shape[0]:,} cached tokens; budget {a.steps} steps x {a.batch} tokens "
          f"({a.steps * a.batch / data.shape[0]:.1f} epochs); {x_test.shape[0]:,} held-out tokens; width {a.width}, "
          f"L0 target {a.k}, lr {a.lr}, torch threads {torch.get_num_threads()}; setup {time.perf_counter() - t0:.0f} s")

    rows = []
    with tempfile.TemporaryDirectory(prefix="train_sae_bench_") as tmp:
        data_file = Path(tmp) / "train.npy"
        np.save(data_file, data)
        np.save(data_file.with_name("test.npy"), x_test.numpy())
        for arch in archs:
            res = train_sae(our_config(arch, a), lambda start: batches(data, a.batch, a.seed, start), progress=False)
            ours_tps = res.tokens / res.seconds
            fvu, l0 = evaluate(res.sae, x_test)
            rows.append((arch, "toolkit", fvu, l0, ours_tps, 1.0, ""))
            for lib in libs:
                got = run_peer(lib, arch, a, data_file, Path(tmp) / f"{lib}-{arch}")
                if isinstance(got, str):
                    rows.append((arch, lib, float("nan"), float("nan"), float("nan"), float("nan"), got))
                else:
                    sae, tps, own_fvu, own_l0 = got
                    fvu, l0 = evaluate(sae, x_test)
                    same = abs(fvu - own_fvu) <= 1e-3 * max(1.0, own_fvu) and abs(l0 - own_l0) <= 0.05
                    note = "" if same else f"its own inference: FVU {own_fvu:.3f}, L0 {own_l0:.1f}"
                    rows.append((arch, lib, fvu, l0, tps, ours_tps / tps, note))
            print(f"# {arch} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print(f"\n{'arch':10s} {'trainer':20s} {'FVU':>7s} {'L0':>7s} {'tokens/s':>10s} {'ours/peer speed':>16s}")
    for arch, who, fvu, l0, tps, ratio, note in rows:
        speed = "" if who == "toolkit" else f"{ratio:15.2f}x"
        print(f"{arch:10s} {who:20s} {fvu:7.3f} {l0:7.1f} {tps:10,.0f} {speed:>16s} {note}")
    print(f"\n# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
