"""Data-parallel training with torch.distributed: what the one loop (trainer.fit) needs to run unchanged under
`torchrun --nproc-per-node N` (and `--nnodes M`).

Every rank holds the whole module and the same optimizer state. Global batch b (cfg.batch_size rows, the same
batches in the same order as one process reads) is cut into world-size slices; rank r trains on slice r. After
backward the gradients are averaged with one all-reduce, so every rank takes the same Adam step: the loss of a
batch is a mean over its rows, and the mean of equal-sized slice means is the batch mean. What couples the rows of
a batch is reduced across ranks too: the BatchTopK selection (the k·B largest activations of the whole batch,
through `global_kth_largest`), the AuxK and FVU variances, the fired-latent mask behind the dead-latent counters,
the smallest selected activation behind the inference threshold, the skip decisions of the NaN guard and the
logged metrics. Rank 0 alone writes checkpoints (atomically, as in one process); every rank resumes from the
checkpoint rank 0 names. Without an initialized process group every function here is the one-process identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from toolkit.errors import ArgumentError

__all__ = ["ShardedStream", "agree", "all_reduce", "average_gradients", "barrier", "broadcast_object",
           "global_kth_largest", "init_from_env", "is_main", "rank", "world_size"]


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and shows progress."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); True if distributed.

    The backend defaults to nccl when CUDA is present and gloo otherwise. On CUDA each rank takes the device
    LOCAL_RANK. An already initialized group is kept."""
    if dist.is_available() and dist.is_initialized():
        return world_size() > 1
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ArgumentError(f"WORLD_SIZE={n} but {', '.join(missing)} not set: launch with "
                            "`torchrun --nproc-per-node N -m toolkit train CONFIG`, which sets them")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced over ranks ('sum', 'max', 'min' or 'mean'); a new tensor, `t` unchanged."""
    out = t.detach().clone()
    if world_size() == 1:
        return out
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(out, op=ops[op])
    return out / world_size() if op == "mean" else out


def agree(flag: bool) -> bool:
    """True only if `flag` is true on every rank (so all ranks skip a step together or none does)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce(torch.tensor([int(flag)], dtype=torch.int32), "min")[0])


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def global_kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the union of every rank's 1-D `values` (a scalar tensor, the same on all ranks).

    Each rank sends only its own top min(k, n) candidates: no rank can hold more than k of the global top k."""
    n = values.numel()
    local = values.topk(min(k, n), sorted=False).values if n else values.new_empty(0)
    pad = torch.full((k,), -torch.inf, dtype=values.dtype, device=values.device)
    pad[:local.numel()] = local
    gathered = [torch.empty_like(pad) for _ in range(world_size())]
    dist.all_gather(gathered, pad)
    return torch.cat(gathered).topk(k, sorted=False).values.min()


def global_centered_sq(x: torch.Tensor) -> torch.Tensor:
    """Σ ||row - mean||² over the rows of the whole global batch (the mean over every rank's rows; two passes)."""
    if world_size() == 1:
        return (x - x.mean(0)).pow(2).sum()
    stats = all_reduce(torch.cat([x.sum(0).flatten(), x.new_tensor([x.shape[0]])]))
    mean = (stats[:-1] / stats[-1]).view_as(x[0])
    return all_reduce((x - mean).pow(2).sum())


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks, in one flat all-reduce.

    A parameter that has a gradient on some rank gets a zero one on the others first, so that every rank (like
    one process over the whole batch) hands Adam the same set of gradients."""
    params = list(params)
    if world_size() == 1 or not params:
        return
    has = all_reduce(torch.tensor([p.grad is not None for p in params], dtype=torch.int32), "max").bool().tolist()
    live = [p for p, h in zip(params, has, strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in live])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in live:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


class ShardedStream:
    """A BatchStream's global batches cut into world-size slices: `next()` hands this rank its rows of the next
    global batch; `peek()` (for initialization) shows the whole global batches, so every rank starts alike;
    `position` counts global batches, as in one process."""

    def __init__(self, stream: Any) -> None:
        self.inner, self.rank, self.world = stream, rank(), world_size()
        self.row_shape = stream.row_shape

    @property
    def position(self) -> int:
        return self.inner.position

    def seek(self, position: int) -> ShardedStream:
        self.inner.seek(position)
        return self

    def peek(self, n: int) -> list[torch.Tensor]:
        return self.inner.peek(n)

    def next(self) -> torch.Tensor | None:
        x = self.inner.next()
        if x is None:
            return None
        if x.shape[0] % self.world:
            raise ArgumentError(f"a global batch of {x.shape[0]} rows cannot be split evenly over {self.world} "
                                f"processes: make batch_size a multiple of {self.world}")
        per = x.shape[0] // self.world
        return x[self.rank * per:(self.rank + 1) * per]


def reduce_batch_stats(out: Any) -> Any:
    """A LossOutput whose `fired` mask (any rank) and `min_selected` (smallest over ranks) cover the global batch."""
    if world_size() == 1:
        return out
    fired = all_reduce(out.fired.to(torch.int32), "max").bool()
    ms = out.min_selected if out.min_selected is not None else out.loss.new_tensor(torch.inf)
    ms = all_reduce(ms.detach().reshape(()), "min")
    return out._replace(fired=fired, min_selected=ms if bool(torch.isfinite(ms)) else None)
