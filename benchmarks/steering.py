"""Steered generation speed on the default model, measured side by side in one run (runs interleaved).

1. Per-token time of steered generation — one SAE clamp; one vector add — against plain Hugging Face
   `generate` on the same prompts (same batch, same number of new tokens). Goal: <= 1.15x.
   The nnsight-traced path (`toolkit.tracing.generate`) is printed for reference.
2. A sweep (one batched generation per strength) against a loop of single-prompt generations.

Times are CPU seconds of this process (time.process_time), with wall seconds beside them: on a shared
machine the wall clock mostly measures the neighbours, CPU time measures the work. With --threads 1 (the
default) CPU time is the compute itself; more threads add their spin-waits to it.

Run: .venv/bin/python benchmarks/steering.py [--batch 4] [--tokens 16] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from toolkit.analysis.steering import LatentSteer, SteeringSpec, VectorSteer, sweep
from toolkit.config import SAEConfig
from toolkit.models import load_model
from toolkit.sae.sae import SAE
from toolkit.tracing import generate
from toolkit.tracing.hooked import generate_hooked

PROMPTS = ["Water boils at a temperature of", "The capital of France is", "My favourite food is",
           "In the morning I usually", "The old castle on the hill", "She opened the letter and",
           "The best way to learn a language is", "Our garden is full of"]


def timed(cases: dict, reps: int) -> dict[str, tuple[float, float]]:
    """Median (CPU seconds, wall seconds) per case."""
    for fn in cases.values():
        fn()  # warm-up
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    wall: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):  # interleaved, so load changes hit every case alike
        for k, fn in cases.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - t)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in cases}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--d-sae", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model = load_model("default", progress=False)
    site = f"blocks.{args.layer}.resid_post"
    sae = SAE.from_config(SAEConfig(d_in=model.d_model, d_sae=args.d_sae, architecture="topk", k=32, site=site), seed=0)
    prompts = PROMPTS[: args.batch]
    n = args.tokens
    clamp = SteeringSpec([LatentSteer(sae, 7, "clamp", 5.0)])
    add = SteeringSpec([VectorSteer(torch.randn(model.d_model), site, "add", 0.5, unit=50.0, name="v")])
    batch = model.tokenize(prompts, padding_side="left")
    kw = {"max_new_tokens": n, "min_new_tokens": n}  # every case makes exactly n tokens per prompt

    cases = {
        "plain HF generate": lambda: model.hf.generate(**batch, **kw, do_sample=False,
                                                       pad_token_id=model.tokenizer.pad_token_id),
        "steered: vector add": lambda: add.generate(model, prompts, **kw),
        "steered: SAE clamp": lambda: clamp.generate(model, prompts, **kw),
        "nnsight trace, vector add": lambda: generate(model, prompts, add.edits(model), max_new_tokens=n),
    }
    # the hooked path and the nnsight path apply the same edits: check before timing
    assert generate_hooked(model, prompts, clamp.edits(model), max_new_tokens=8) == \
        generate(model, prompts, clamp.edits(model), max_new_tokens=8)
    med = timed(cases, args.reps)
    tok = n * len(prompts)
    print(f"model {model.name}, {site}, batch {len(prompts)} x {n} new tokens, {args.threads} threads, "
          f"median of {args.reps} (interleaved)")
    for k, (c, w) in med.items():
        print(f"  {k:28s} {c * 1e3 / tok:7.2f} ms CPU/token   (wall {w * 1e3 / tok:7.2f} ms/token)")
    for k in ("steered: vector add", "steered: SAE clamp", "nnsight trace, vector add"):
        r = med[k][0] / med["plain HF generate"][0]
        rw = med[k][1] / med["plain HF generate"][1]
        print(f"{k}: {r:.3f}x plain HF generate per token in CPU time, {rw:.3f}x in wall time "
              f"(goal <= 1.15x) -> {'PASS' if r <= 1.15 else 'FAIL'}")

    strengths = [0.0, 0.5, 1.0]
    loop_prompts = PROMPTS
    sw = {
        "sweep (batched per strength)": lambda: sweep(model, loop_prompts, add, strengths, max_new_tokens=n // 2,
                                                      progress=False),
        "loop of single generations": lambda: [add.with_strength(s).generate(model, [p], max_new_tokens=n // 2)
                                               for s in strengths for p in loop_prompts],
    }
    med = timed(sw, max(1, args.reps - 1))
    print(f"sweep: {len(loop_prompts)} prompts x {len(strengths)} strengths x {n // 2} tokens")
    for k, (c, w) in med.items():
        print(f"  {k:28s} {c:7.2f} s CPU   (wall {w:7.2f} s)")
    loop, sw_ = med["loop of single generations"], med["sweep (batched per strength)"]
    print(f"sweep speed-up over the loop: {loop[0] / sw_[0]:.2f}x in CPU time, {loop[1] / sw_[1]:.2f}x in wall time")


if __name__ == "__main__":
    main()
