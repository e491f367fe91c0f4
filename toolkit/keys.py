"""Cache keys: a stable hash of everything that changes a result (configs as canonical JSON, model weights)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

_SAMPLES = 4096  # values per tensor in a sampled weight fingerprint


def stable_hash(obj: Any) -> str:
    """sha256 (hex) of `obj` as canonical JSON (sorted keys, no spaces; tuples as lists, other objects by str)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_weights_id(files: dict[str, Any]) -> str:
    """Identity of a folder's exact files from its manifest entries (name → sha256)."""
    return stable_hash({name: entry.get("sha256") for name, entry in files.items()})


def tensors_fingerprint(tensors: dict[str, torch.Tensor], *, sample: int | None = None) -> str:
    """sha256 of named tensors (names, shapes, dtypes, values; with `sample`, that many evenly spaced values each)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        flat = t.reshape(-1)
        if sample is not None and flat.numel() > sample:
            flat = flat[:: flat.numel() // sample][:sample]
        h.update(flat.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: Any) -> str:
    """Identity of a model's weights and compute dtype: the manifest-derived `extra["weights_sha256"]` where the
    loader recorded one, else a hash of evenly sampled values of every parameter and buffer."""
    weights = getattr(model, "extra", {}).get("weights_sha256")
    if not weights:
        weights = tensors_fingerprint(dict(model.hf.state_dict()), sample=_SAMPLES)
    return stable_hash({"weights": weights, "dtype": str(model.dtype)})
