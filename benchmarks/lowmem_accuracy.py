"""Low-memory load (bf16 embedding, fp32 compute) vs all-fp32 on the default model: accuracy, memory, speed.

Prints top-1 agreement and max |logit difference| over held-out contexts, the resident weight bytes of both,
and a full-forward and a generate timing side by side.

Run: .venv/bin/python benchmarks/lowmem_accuracy.py [--contexts 32] [--ctx 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from toolkit.data import load_texts, token_contexts
from toolkit.models import load_model
from toolkit.tracing import generate


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.hf.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def timed(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ref = load_model("default", dtype=torch.float32, low_memory=False, progress=False)
    lean = load_model("default", progress=False, low_memory=True)
    assert ref.hf.lm_head.weight.dtype == torch.float32 and lean.hf.lm_head.weight.dtype == torch.bfloat16
    ctxs = token_contexts(ref.tokenizer, load_texts("default"), args.ctx)[-args.contexts:]
    agree, total, max_diff, max_rel = 0, 0, 0.0, 0.0
    for s in range(0, len(ctxs), args.batch):
        ids = ctxs[s:s + args.batch]
        a, b = ref.hf(input_ids=ids).logits, lean.hf(input_ids=ids).logits
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0] * a.shape[1]
        max_diff = max(max_diff, float((a - b).abs().max()))
        max_rel = max(max_rel, float((a - b).abs().max() / a.abs().max()))
    print(f"{total} token positions ({len(ctxs)} held-out contexts x {args.ctx}): top-1 agreement "
          f"{agree / total:.4%}, max |logit diff| {max_diff:.2e} (relative to max |logit| {max_rel:.1e})")
    print(f"weights: fp32 {weight_bytes(ref) / 1e9:.3f} GB, low-memory {weight_bytes(lean) / 1e9:.3f} GB")
    ids = ctxs[:args.batch]
    times = {}
    for name, m in (("fp32", ref), ("low-memory", lean)):
        fwd = timed(lambda m=m: m.hf(input_ids=ids), args.reps)
        gen = timed(lambda m=m: generate(m, "Water boils at a temperature of", max_new_tokens=16), args.reps)
        times[name] = (fwd, gen)
        print(f"{name:11s} full forward {args.batch}x{args.ctx}: {fwd * 1e3:7.0f} ms   generate 16 tokens: "
              f"{gen * 1e3:7.0f} ms", flush=True)
    (f32, g32), (flm, glm) = times["fp32"], times["low-memory"]
    print(f"low-memory / fp32: full forward {flm / f32:.2f}x, generate {glm / g32:.2f}x")

if __name__ == "__main__":
    main()
