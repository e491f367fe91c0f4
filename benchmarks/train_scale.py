"""Training throughput at scale, measured side by side in one run: 1 vs 2 data-parallel processes (gloo, CPU), and
the activation cache's read rate vs the trainer's consumption rate (is disk or compute the bottleneck?).

Activations are synthetic (sparse mixtures of random directions plus noise, width 640 like the default model's
residual stream), written once to an activation cache in a temp folder: the figures are about the machinery
(cache reads, the training step, the gradient all-reduce), which does not depend on where activations came from.
Every process uses one thread, so "2 processes" uses the two cores this machine has; "1 process, 2 threads" shows
what intra-op threading gets from the same cores. Tokens/s counts training tokens after the first `--warmup`
steps (initialization and the first steps excluded) on rank 0's clock.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/train_scale.py             # ~2 min on 2 cores
    PYTHONPATH=$PWD .venv/bin/python benchmarks/train_scale.py --quick     # smoke run

Where CUDA is present it also prints training tokens/s at Gemma-2-2B width 16k (TopK, BatchTopK) from batches
already on the GPU; `torchrun --nproc-per-node N -m toolkit train job.toml` is the same training code with nccl.
The GPU kernel figures (Triton fused encode vs cuBLAS, sparse vs dense decode) are benchmarks/sae_kernels.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from toolkit.config import CacheConfig, SAEConfig, TrainConfig
from toolkit.tracing import ActivationCache
from toolkit.training import train_sae

SITE = "blocks.6.resid_post"


def make_cache(folder: Path, rows: int, d: int, shard_rows: int = 4096) -> ActivationCache:
    """A cache of `rows` synthetic activations (float32) at SITE, in shards of `shard_rows`."""
    n_shards = rows // shard_rows
    cfg = CacheConfig(model="synthetic", sites=(SITE,), d=(d,), ctx_len=shard_rows // 64 + 1,
                      n_contexts=64 * n_shards, fingerprint="0" * 64, shard_contexts=64)
    cache = ActivationCache.create(folder, cfg)
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(512, d, generator=g) / d ** 0.5 * 8
    for i in range(n_shards):
        codes = torch.rand(shard_rows, 512, generator=g) * (torch.rand(shard_rows, 512, generator=g) < 0.05)
        cache.write_shard(i, {SITE: codes @ dirs + 0.1 * torch.randn(shard_rows, d, generator=g)},
                          torch.arange(shard_rows))
    cache.close()
    return ActivationCache.open(folder)


def read_rate(folder: Path, batch: int) -> float:
    """Rows per second of one shuffled pass over the cache, as the trainer reads it (one thread)."""
    cache = ActivationCache.open(folder, verify=False)
    t0, rows = time.perf_counter(), 0
    for x in cache.iter_batches(batch, shuffle=True, seed=1):
        rows += x.shape[0]
    return rows / (time.perf_counter() - t0)


def config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(SAEConfig(args.d, args.width, "topk", k=32, site=SITE), batch_size=args.batch,
                       total_steps=args.steps, lr=1e-3, log_every=args.steps)


def _train(rank: int, world: int, store: str, folder: str, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    waited = [0.0]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        _time_collectives(dist, waited)
    stamps: list[float] = []
    marks: list[float] = []

    def tick(step: int, _m: dict) -> None:
        stamps.append(time.perf_counter())
        marks.append(waited[0])

    train_sae(config(args), folder, progress=False, callback=tick)
    if rank == 0:
        w = args.warmup
        tokens = (len(stamps) - 1 - w) * args.batch
        span = stamps[-1] - stamps[w]
        Path(out).write_text(json.dumps({"tokens_per_s": tokens / span, "steps": len(stamps),
                                         "collective_share": (marks[-1] - marks[w]) / span}))
    if world > 1:
        dist.destroy_process_group()


def _time_collectives(dist, waited: list[float]) -> None:
    """Add the wall time spent inside torch.distributed collectives (waiting for the other rank included)."""
    for name in ("all_reduce", "all_gather", "broadcast_object_list", "barrier"):
        fn = getattr(dist, name)

        def timed(*a, _fn=fn, **kw):
            t = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                waited[0] += time.perf_counter() - t

        setattr(dist, name, timed)


def train_rate(folder: Path, args: argparse.Namespace, world: int, threads: int, tmp: Path) -> dict:
    """Training tokens/s (and the share of rank 0's time in collectives) with `world` processes of `threads`."""
    args = argparse.Namespace(**{**vars(args), "threads": threads})
    out, store = tmp / f"rate-{world}-{threads}.json", tmp / f"store-{world}-{threads}"
    if world == 1:
        _train(0, 1, str(store), str(folder), args, str(out))
    else:
        mp.start_processes(_train, args=(world, str(store), str(folder), args, str(out)), nprocs=world,
                           start_method="spawn")
    return json.loads(out.read_text())


def gpu_rates(steps: int = 60, warmup: int = 10) -> dict[str, float]:
    """Training tokens/s on CUDA at Gemma-2-2B's width (d_in 2304, 16k latents, batch 4096), from batches already
    on the GPU (a pool of 8, cycled), per architecture; {} without CUDA."""
    if not torch.cuda.is_available():
        return {}
    g = torch.Generator(device="cuda").manual_seed(0)
    dirs = torch.randn(1024, 2304, device="cuda", generator=g) / 2304 ** 0.5 * 8
    pool = [(torch.rand(4096, 1024, device="cuda", generator=g) < 0.03).float() @ dirs for _ in range(8)]

    def source(start: int):
        i = start
        while True:
            yield pool[i % len(pool)]
            i += 1

    out = {}
    for arch in ("topk", "batchtopk"):
        cfg = TrainConfig(SAEConfig(2304, 16384, arch, k=64), batch_size=4096, total_steps=steps, lr=1e-4,
                          device="cuda", log_every=steps)
        stamps: list[float] = []
        train_sae(cfg, source, progress=False, callback=lambda step, m, s=stamps: s.append(time.perf_counter()))
        out[arch] = (len(stamps) - 1 - warmup) * 4096 / (stamps[-1] - stamps[warmup])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=65_536, help="rows in the synthetic cache")
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024, help="global batch")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: small cache, width 1024, 12 steps")
    args = p.parse_args()
    if args.quick:
        args.rows, args.width, args.steps, args.warmup = 16_384, 1024, 12, 3
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="train-scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_cache(tmp / "cache", args.rows, args.d)
        print(f"synthetic cache: {args.rows:,} rows x {args.d} float32 "
              f"({args.rows * args.d * 4 / 1e6:.0f} MB), written in {time.perf_counter() - t0:.1f} s")
        reads = [read_rate(tmp / "cache", args.batch) for _ in range(2)]
        print(f"SAE topk d_in={args.d} width={args.width} k=32, global batch {args.batch}, {args.steps} steps "
              f"(tokens/s after {args.warmup} warm-up steps)")
        rates = {(1, 1): train_rate(tmp / "cache", args, 1, 1, tmp),
                 (2, 1): train_rate(tmp / "cache", args, 2, 1, tmp),
                 (1, 2): train_rate(tmp / "cache", args, 1, 2, tmp)}
    base = rates[(1, 1)]["tokens_per_s"]
    print(f"{'setup':<28}{'tokens/s':>12}{'vs 1 process':>14}{'in collectives':>16}")
    for (world, threads), r in rates.items():
        label = f"{world} process{'es' if world > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        print(f"{label:<28}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / base:>13.2f}x"
              f"{r['collective_share']:>15.0%}")
    fastest = max(r["tokens_per_s"] for r in rates.values())
    print(f"cache read rate (one thread, shuffled; 1st pass {reads[0]:,.0f}, 2nd pass {reads[1]:,.0f} rows/s): "
          f"{min(reads) / fastest:.1f}x the fastest trainer's consumption -> "
          f"{'compute' if min(reads) > fastest else 'disk'} is the bottleneck here")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for arch, r in gpu_rates().items():  # only where CUDA is present
        print(f"CUDA {torch.cuda.get_device_name()}: {arch} SAE d_in 2304 x 16,384, batch 4096: {r:,.0f} tokens/s")


if __name__ == "__main__":
    main()
