"""The fine-tuned model as a cached Hugging Face folder, written atomically and reused when its config matches."""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from toolkit.data import load_texts, texts_fingerprint
from toolkit.errors import CheckpointError
from toolkit.finetune import train
from toolkit.finetune.behaviour import get_behaviour
from toolkit.finetune.train import FinetuneConfig
from toolkit.folders import lock_folder, make_dir, recover_folder, staged_folder
from toolkit.io import DTYPES, MANIFEST, atomic_write_json, read_json, verify_manifest, write_manifest
from toolkit.keys import model_fingerprint, stable_hash
from toolkit.lowmem import trim
from toolkit.models import Model, load_model
from toolkit.paths import cache_dir

log = logging.getLogger(__name__)
INFO_FILE = "finetune.json"


def finetuned_dir(behaviour: str = "pirate", cfg: FinetuneConfig | None = None, base_name: str = "gemma-3-270m") -> Path:
    """Where the fine-tune of the default model lives in the user cache (it may not exist yet)."""
    cfg = cfg or FinetuneConfig(behaviour=behaviour)
    suffix = "" if cfg == FinetuneConfig(behaviour=behaviour) else f"-{cfg.key()}"
    return cache_dir() / f"{base_name}-{behaviour}{suffix}"


def finetuned_ready(folder: str | os.PathLike, cfg: FinetuneConfig, texts_sha256: str | None = None,
                    base_sha256: str | None = None) -> bool:
    """True when `folder` is a complete fine-tune made with `cfg` (a manifest listing every file, inside the folder,
    sizes as listed) and, when given, trained on exactly those texts (`toolkit.data.texts_fingerprint`) from
    exactly that base model (`toolkit.keys.model_fingerprint`)."""
    folder = recover_folder(Path(folder))
    try:
        verify_manifest(folder, ["config.json", INFO_FILE], complete=True, sha256=False)
        info = read_json(folder / INFO_FILE, "fine-tune info")
    except CheckpointError as e:
        if folder.exists():
            log.warning("not reusing %s: %s", folder, e)
        return False
    if info.get("config") != cfg.to_dict():
        return False
    if texts_sha256 is not None and info.get("texts_sha256") != texts_sha256:
        return False  # trained on another corpus (e.g. before the default corpus changed): never reused
    return base_sha256 is None or info.get("base_sha256") == base_sha256


def prepare_finetuned(behaviour: str = "pirate", *, cfg: FinetuneConfig | None = None, base: str | Model = "default",
                      folder: str | os.PathLike | None = None, texts: Sequence[str] | None = None,
                      progress: bool = True) -> Path:
    """Make (once) and return the folder of `base` fine-tuned with `behaviour`; later calls reuse it.

    `base` is "default" (the embedded Gemma 3 270M, loaded fresh in fp32) or a Model, which is copied, never
    changed. The folder is locked while it is made (a second process gets FolderLockedError), built under a temp
    name and swapped in whole, so an interrupted run leaves the old folder (or none), never a half-written one.
    """
    cfg = cfg or FinetuneConfig(behaviour=behaviour)
    if cfg.behaviour != behaviour:
        raise ValueError(f"cfg.behaviour is {cfg.behaviour!r} but behaviour={behaviour!r}")
    base_sha256 = None if isinstance(base, str) else model_fingerprint(base)
    if folder is None:
        folder = finetuned_dir(behaviour, cfg) if isinstance(base, str) else \
            cache_dir() / f"{base.name}-{behaviour}-{stable_hash([cfg.to_dict(), base_sha256])[:10]}"
    folder = Path(folder).expanduser()
    texts = list(texts) if texts is not None else load_texts("default")
    texts_sha256 = texts_fingerprint(texts)
    if finetuned_ready(folder, cfg, texts_sha256, base_sha256):
        return folder
    if isinstance(base, str) and base != "default":
        raise ValueError(f"base must be 'default' or a Model, got {base!r}")
    make_dir(folder.parent, "toolkit cache folder")
    with lock_folder(folder, "fine-tune folder"):
        if not finetuned_ready(folder, cfg, texts_sha256, base_sha256):  # another process may have just made it
            _make_finetuned(behaviour, cfg, base, folder, texts, texts_sha256, base_sha256, progress)
            gc.collect()  # the trained copy sits in reference cycles (nnsight envoys): free it before the caller loads
            trim()
    return folder


def _make_finetuned(behaviour: str, cfg: FinetuneConfig, base: str | Model, folder: Path, texts: list[str],
                    texts_sha256: str, base_sha256: str | None, progress: bool) -> None:
    if isinstance(base, str):
        model = load_model("default", device="cpu", dtype=torch.float32, progress=progress)
    else:
        hf = copy.deepcopy(base.hf).float()
        model = dataclasses.replace(base, hf=hf, nn=None)
    result = train.finetune(model, cfg, texts=texts, progress=progress)
    with staged_folder(folder) as tmp:
        model.hf.to(DTYPES[cfg.save_dtype]).save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, {
            "config": cfg.to_dict(), "texts_sha256": texts_sha256, "base_sha256": base_sha256,
            "behaviour": get_behaviour(behaviour).description, "base": model.name,
            "trained": result.trained, "seconds": round(result.seconds, 1),
            "planted_loss": result.planted_loss, "other_loss": result.other_loss, "keep_loss": result.keep_loss,
        })
        write_manifest(tmp, sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                                   if p.is_file() and p.name != MANIFEST))


def load_finetuned(behaviour: str = "pirate", *, cfg: FinetuneConfig | None = None, progress: bool = True,
                   device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> Model:
    """The default model fine-tuned with `behaviour` (prepared on first use, a few minutes on CPU), named after
    its folder, e.g. 'gemma-3-270m-pirate'; `model.extra["weights_sha256"]` identifies the exact weights."""
    folder = prepare_finetuned(behaviour, cfg=cfg, progress=progress)
    model = load_model(str(folder), device=device, dtype=dtype, progress=progress)
    model.name = folder.name
    return model  # load_model recorded model.extra["weights_sha256"] from the manifest: keys caches by these weights
