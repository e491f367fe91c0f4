"""Starting, resuming and saving a training run (one process or data parallel).

A fresh run seeds python, numpy and torch with cfg.seed; `resume` restores the newest complete checkpoint of
out_dir with its RNG states. Data parallel, rank 0 names the checkpoint every rank loads and alone writes new ones.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.errors import CheckpointError
from toolkit.training import distributed
from toolkit.training.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:
    from toolkit.training.trainer import Run

log = logging.getLogger(__name__)


def restore_rng(t: dict[str, torch.Tensor], s: dict[str, Any]) -> None:
    torch.set_rng_state(t["rng.torch"])
    cuda = [t[k] for k in sorted(t) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    ver, mt, gauss = s["rng_python"]
    random.setstate((ver, tuple(mt), gauss))
    npos, has_gauss, cached = s["rng_numpy"]
    np.random.set_state(("MT19937", t["rng.numpy"].numpy().astype(np.uint32), npos, has_gauss, cached))


def start(run: Run, out: Path | None, resume: bool) -> bool:
    """Restore the newest complete checkpoint (resume) or seed a fresh run; True if resumed."""
    if resume and out is None:
        raise ValueError("resume=True needs the out_dir holding the checkpoints")
    ck = None
    if out is not None and distributed.world_size() > 1:
        ck = _agreed_checkpoint(run, out, resume)
    elif out is not None and resume:
        ck = load_latest_checkpoint(out, device=run.cfg.device)
    elif out is not None:
        _refuse_old_run(out)
    if resume and ck is None:
        log.info("no complete checkpoint in %s: starting a fresh run", out)
    if ck is not None:
        run.restore(ck)
        log.info("resumed from %s (step %d)", ck.path, run.step)
        return True
    random.seed(run.cfg.seed)
    np.random.seed(run.cfg.seed)
    torch.manual_seed(run.cfg.seed)
    return False


def _refuse_old_run(out: Path) -> None:
    if list_checkpoints(out):
        raise CheckpointError(f"{out} already holds checkpoints ({list_checkpoints(out)[-1].name}); pass resume=True "
                              "to continue that run, or choose another out_dir")


def _agreed_checkpoint(run: Run, out: Path, resume: bool) -> Checkpoint | None:
    """Data parallel: rank 0 names the checkpoint to resume from (or the refusal), and every rank loads it."""
    path, problem = None, None
    if distributed.is_main():
        try:
            path = latest_checkpoint(out) if resume else _refuse_old_run(out)
        except CheckpointError as e:
            problem = str(e)
    path, problem = distributed.broadcast_object((path, problem))
    if problem is not None:
        raise CheckpointError(problem)
    return load_checkpoint(path, device=run.cfg.device) if path is not None else None


def save(run: Run, out: Path, module: Any = None) -> Path | None:
    """Rank 0 writes the checkpoint (and the final module); the others wait until it is complete."""
    saved = out / run.name if module is not None else None
    if distributed.is_main():
        save_checkpoint(out, run.step, run.tensors(), run.state(), keep=run.cfg.keep_checkpoints)
        saved = module.save(saved) if module is not None else None
    distributed.barrier()
    return saved
