"""Complete, atomic training checkpoints: `out_dir/checkpoints/step_{N:08d}/`.

A checkpoint is written into a temp folder (`.tmp-step_…`) — tensors, then state.json, then manifest.json with
sizes and sha256, written last — and only then renamed into place with os.replace, so a folder named `step_*`
is complete by construction; a crash mid-save leaves a temp folder that is never listed and is removed by the
next save. Older checkpoints are deleted only after the new one is in place (the newest `keep` stay).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from toolkit.devices import resolve_device
from toolkit.errors import CheckpointError
from toolkit.folders import fsync_tree, swap_in
from toolkit.io import (
    MANIFEST,
    TMP_PREFIX,
    atomic_save_tensors,
    atomic_write_json,
    load_tensors,
    read_json,
    verify_manifest,
    write_manifest,
)

CHECKPOINTS = "checkpoints"
TENSORS = "state.safetensors"
STATE = "state.json"
FORMAT = 1
_NAME = re.compile(r"step_(\d{8})")


class Checkpoint(NamedTuple):
    """A loaded checkpoint: its folder, its tensors and its JSON state."""

    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after `step` optimizer steps."""
    return f"step_{step:08d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders in `out_dir/checkpoints`, oldest first (temp folders are never listed)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(out_dir: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write a complete checkpoint for `step` atomically, then delete all but the newest `keep` checkpoints.

    The caller holds the writer's lock on `out_dir` (`toolkit.folders.lock_folder`; `fit` does), since this
    deletes temp folders left by crashed saves."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(TMP_PREFIX + "*"):  # leftovers of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        atomic_save_tensors(tmp / TENSORS, tensors)
        atomic_write_json(tmp / STATE, {"format": FORMAT, "step": step, **state})
        write_manifest(tmp, [TENSORS, STATE], extra={"step": step})
        fsync_tree(tmp)
        swap_in(tmp, final)  # final may exist: re-saving a step after falling back past a corrupt checkpoint
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Verify a checkpoint folder's manifest and load it; CheckpointError naming the problem otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    verify_manifest(path, [TENSORS, STATE])
    state = read_json(path / STATE, what="checkpoint state")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path / STATE}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return Checkpoint(path, load_tensors(path / TENSORS, device=resolve_device(device)), state)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose manifest verifies; a corrupt newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            verify_manifest(path, [TENSORS, STATE])
        except CheckpointError as e:
            warnings.warn(f"skipping corrupt checkpoint {path.name}: {e}; falling back to an older one",
                          stacklevel=2)
            continue
        return path
    return None


def load_latest_checkpoint(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint | None:
    """Load the newest checkpoint that loads completely, falling back (with a warning) past corrupt ones."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return load_checkpoint(path, device=device)
        except CheckpointError as e:
            warnings.warn(f"skipping corrupt checkpoint {path.name}: {e}; falling back to an older one",
                          stacklevel=2)
    return None


__all__ = [
    "CHECKPOINTS", "MANIFEST", "Checkpoint", "checkpoint_name", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_latest_checkpoint", "save_checkpoint",
]
