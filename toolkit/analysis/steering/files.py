"""Save and load a SteeringSpec as a folder: spec.json (the items) + vectors.safetensors (vector items).

SAEs are not copied into the folder: latent items name their SAE (`sae_name`), and `load_spec` takes the
SAEs (a mapping by name, or a list matched by the site each was trained on).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from toolkit.analysis.steering.spec import SteeringSpec
from toolkit.errors import CheckpointError
from toolkit.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json

SPEC_FILE = "spec.json"
VECTORS_FILE = "vectors.safetensors"
FORMAT = "toolkit.steering/1"


def save_spec(spec: SteeringSpec, folder: str | os.PathLike) -> Path:
    """Write the spec into `folder` (vectors first, the JSON last, both atomically); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vectors = spec.vectors()
    atomic_save_tensors(folder / VECTORS_FILE, {f"item{i}": v for i, v in enumerate(vectors.values())})
    names = {name: f"item{i}" for i, name in enumerate(vectors)}
    items = [dict(d, tensor=names.get(d["name"])) if d["kind"] == "vector" else d for d in spec.to_items()]
    atomic_write_json(folder / SPEC_FILE, {"format": FORMAT, "items": items})
    return folder


def load_spec(folder: str | os.PathLike, saes: Mapping[str, Any] | Sequence[Any] | None = None) -> SteeringSpec:
    """Read a folder written by `save_spec`; latent items need their SAEs in `saes`."""
    folder = Path(folder)
    meta = read_json(folder / SPEC_FILE, "steering spec")
    if meta.get("format") != FORMAT or not isinstance(meta.get("items"), list):
        raise CheckpointError(f"{folder / SPEC_FILE}: not a steering spec (format {meta.get('format')!r}, want {FORMAT!r})")
    tensors = load_tensors(folder / VECTORS_FILE)
    vectors = {}
    for d in meta["items"]:
        if d.get("kind") == "vector":
            if d.get("tensor") not in tensors:
                raise CheckpointError(f"{folder / VECTORS_FILE}: no tensor {d.get('tensor')!r} for item {d.get('name')!r}")
            vectors[d["name"]] = tensors[d["tensor"]]
    return SteeringSpec.from_items(meta["items"], vectors=vectors, saes=saes)
