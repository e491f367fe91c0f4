"""Atomic file writes, strict weight folders (safetensors + cfg.json + sha256 manifest) and tensor-file readers."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from toolkit.config.sae import SAE_DTYPES
from toolkit.errors import CheckpointError
from toolkit.folders import TMP_PREFIX, fsync_dir, lock_folder, recover_folder, staged_folder

MANIFEST = "manifest.json"
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in SAE_DTYPES}
"""Every dtype the toolkit stores, by name ('float32', 'bfloat16', 'float16', 'float64')."""
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class Weights(NamedTuple):
    """What a format loader returns: the config to build from, tensors under our names, and the file they came from."""

    cfg: Any
    tensors: dict[str, torch.Tensor]
    source: str


def _replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` to a temp file beside `path`, fsync it, rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    _replace_atomically(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as pretty JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (contiguous copies, so views and slices are fine)."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _replace_atomically(Path(path), lambda tmp: write_tensors(tmp, cpu, metadata))


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its write errors (a full disk, a size limit) as CheckpointError naming the file."""
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: cannot write weights ({e}); is the disk full?") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """Size and sha256 of one file, as stored in manifests."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: str | os.PathLike, files: list[str], extra: dict[str, Any] | None = None) -> None:
    """Record size and sha256 of `files` (names inside `folder`) in `folder/manifest.json`."""
    folder = Path(folder)
    entries = {name: file_entry(folder / name) for name in files}
    atomic_write_json(folder / MANIFEST, {"files": entries, **(extra or {})})


def check_manifest_names(folder: Path, names: Any, mpath: Path) -> None:
    """CheckpointError unless every name is a plain relative path that stays inside `folder`."""
    if not isinstance(names, dict):
        raise CheckpointError(f"{mpath}: 'files' must map file names to their size and sha256")
    root = folder.resolve()
    for name in names:
        bad = (not isinstance(name, str) or not name or "\\" in name or "\0" in name
               or Path(name).is_absolute() or ".." in Path(name).parts)
        if not bad and not (folder / name).resolve().is_relative_to(root):
            bad = True  # a symlink leading out of the folder
        if bad:
            raise CheckpointError(f"{mpath}: lists {name!r}, which is not a path inside {folder}; "
                                  "a manifest may only name files in its own folder (refused)")


def read_manifest(folder: str | os.PathLike, required: Iterable[str] = (), *,
                  complete: bool = False) -> dict[str, Any]:
    """The folder's manifest after checking its shape and names: every `required` file must be listed, and with
    `complete` every file in the folder; CheckpointError naming the problem otherwise. Files are not hashed."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: manifest missing; a complete folder has {MANIFEST} listing its files")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        check_manifest_names(folder, files, mpath)
        for name, want in files.items():
            if not isinstance(want, dict) or not isinstance(want.get("bytes"), int):
                raise TypeError(f"entry {name!r} is {want!r}")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from e
    need = set(required)
    if complete:
        need |= {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                 if p.is_file() and p.name != MANIFEST}
    unlisted = sorted(need - set(files))
    if unlisted:
        raise CheckpointError(f"{mpath}: does not list {unlisted}, which the loader reads; the manifest must "
                              "cover every file it vouches for (refused)")
    return manifest


def verify_manifest(folder: str | os.PathLike, required: Iterable[str] = (), *, complete: bool = False,
                    sha256: bool = True) -> dict[str, Any]:
    """Check the manifest (see `read_manifest`) and every file it lists (present, size, and with `sha256` its
    digest); raise CheckpointError naming the first bad one."""
    folder = Path(folder)
    manifest = read_manifest(folder, required, complete=complete)
    for name, want in manifest["files"].items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{p}: {size} bytes, manifest says {want['bytes']} (truncated or replaced)")
        if not sha256:
            continue
        digest = sha256_file(p)
        if digest != want.get("sha256"):
            raise CheckpointError(f"{p}: sha256 {digest[:12]}… does not match the manifest's "
                                  f"{str(want.get('sha256'))[:12]}…")
    return manifest


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or DeviceUnavailableError when torch does not know it or this machine lacks it."""
    from toolkit.devices import resolve_device  # devices imports io

    return resolve_device(device)


def read_json(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """Read a JSON object, turning absence or corruption into CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file missing")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning truncation or corruption into CheckpointError."""
    path = Path(path)
    check_device(device)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e}); the file is truncated or not safetensors") from e


def read_torch_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch .pt state-dict file (torch.compile's `_orig_mod.` prefixes removed)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_tensors(path)
    else:
        if not path.is_file():
            raise CheckpointError(f"{path}: weights file missing")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: cannot read ({e}); the file is truncated or not a torch state dict") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def save_weight_folder(folder: str | os.PathLike, tensors: Mapping[str, torch.Tensor], cfg: dict[str, Any],
                       weights_name: str = "weights.safetensors") -> Path:
    """Write `weights.safetensors` + `cfg.json` + manifest into a sibling temp folder, then swap it in whole: the
    folder is always the complete old one or the complete new one. Other entries of an existing folder are kept."""
    folder = Path(folder).expanduser()
    with lock_folder(folder, "weights folder"):
        old = sorted(p.name for p in folder.iterdir()) if recover_folder(folder).is_dir() else []
        own = {weights_name, "cfg.json", MANIFEST}
        with staged_folder(folder, keep=tuple(n for n in old if n not in own)) as tmp:
            write_tensors(tmp / weights_name, {k: v.detach().contiguous().cpu() for k, v in tensors.items()})
            (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            write_manifest(tmp, [weights_name, "cfg.json"])
    return folder


def load_weight_folder(folder: str | os.PathLike, weights_name: str = "weights.safetensors",
                       device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify the manifest (it must list the weights and cfg.json), then return (tensors, cfg); CheckpointError on
    any inconsistency."""
    folder = recover_folder(Path(folder).expanduser())
    check_device(device)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    verify_manifest(folder, [weights_name, "cfg.json"])
    cfg = read_json(folder / "cfg.json")
    return load_tensors(folder / weights_name, device=device), cfg
