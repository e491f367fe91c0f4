"""Checks every SAE format loader shares: tensor names and shapes, required keys, dtypes, site names."""

from __future__ import annotations

import os
from typing import Any

import torch

from toolkit.config import SAEConfig
from toolkit.errors import CheckpointError, HookNotFoundError
from toolkit.io import DTYPE_NAMES, DTYPES, Weights
from toolkit.sites import Site


def take(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: os.PathLike | str,
         optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Check that `tensors` holds exactly the names in `shapes` (plus `optional`) with those shapes; return them."""
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes) - set(optional))
    if missing or extra:
        raise CheckpointError(
            f"{source}: expected tensors {sorted(shapes)}"
            + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "")
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
    return tensors


def need(d: dict[str, Any], key: str, source: os.PathLike | str, kind: type | tuple[type, ...] = int) -> Any:
    """d[key], checked to exist and have type `kind`; CheckpointError naming `source` otherwise."""
    if key not in d or d[key] is None:
        raise CheckpointError(f"{source}: required key {key!r} is missing")
    value = d[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise CheckpointError(f"{source}: {key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def dtype_name(dtype: str | torch.dtype, source: os.PathLike | str) -> str:
    """'float32' from 'float32', 'torch.float32' or torch.float32; CheckpointError for anything else."""
    name = DTYPE_NAMES.get(dtype) if isinstance(dtype, torch.dtype) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"{source}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return name


def build(cfg_kwargs: dict[str, Any], tensors: dict[str, torch.Tensor], *, weights_file: os.PathLike | str,
          cfg_file: os.PathLike | str) -> Weights:
    """Make the SAEConfig (errors name `cfg_file`) and cast the tensors to its dtype."""
    try:
        cfg = SAEConfig(**cfg_kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e
    dt = DTYPES[cfg.dtype]
    tensors = {k: v.detach().to(dt) for k, v in tensors.items()}
    tensors.setdefault("input_scale", torch.tensor(1.0, dtype=dt))
    return Weights(cfg, tensors, str(weights_file))


def site_or_none(name: str | None) -> str | None:
    """Our canonical site name for `name` (e.g. 'blocks.6.hook_resid_post'), or None if it is not one of ours."""
    if not name:
        return None
    try:
        return Site.parse(name).name
    except HookNotFoundError:
        return None
