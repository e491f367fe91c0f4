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
from toolkit.folders import lock_folder, recover_folder, staged_folder
from toolkit.io import (
    MANIFEST,
    atomic_save_tensors,
    atomic_write_json,
    load_tensors,
    read_json,
    verify_manifest,
    write_manifest,
)

SPEC_FILE = "spec.json"
VECTORS_FILE = "vectors.safetensors"
FORMAT = "toolkit.steering/1"


def save_spec(spec: SteeringSpec, folder: str | os.PathLike) -> Path:
    """Write the spec (vectors, JSON, manifest) into a staged folder swapped in whole: saving over an earlier spec
    leaves either it or the new one, never new vectors under old items. Other entries of the folder are kept."""
    folder = Path(folder).expanduser()
    vectors = spec.vectors()
    names = {name: f"item{i}" for i, name in enumerate(vectors)}
    items = [dict(d, tensor=names.get(d["name"])) if d["kind"] == "vector" else d for d in spec.to_items()]
    with lock_folder(folder, "steering spec folder"):
        old = sorted(p.name for p in folder.iterdir()) if recover_folder(folder).is_dir() else []
        with staged_folder(folder, keep=tuple(n for n in old if n not in (SPEC_FILE, VECTORS_FILE, MANIFEST))) as tmp:
            atomic_save_tensors(tmp / VECTORS_FILE, {f"item{i}": v for i, v in enumerate(vectors.values())})
            atomic_write_json(tmp / SPEC_FILE, {"format": FORMAT, "items": items})
            write_manifest(tmp, [SPEC_FILE, VECTORS_FILE])
    return folder


def load_spec(folder: str | os.PathLike, saes: Mapping[str, Any] | Sequence[Any] | None = None) -> SteeringSpec:
    """Read a folder written by `save_spec` (its manifest verified; folders saved before manifests existed are read
    as they are); latent items need their SAEs in `saes`."""
    folder = recover_folder(Path(folder).expanduser())
    if (folder / MANIFEST).is_file():
        verify_manifest(folder, [SPEC_FILE, VECTORS_FILE])
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
