"""The fine-tuned model as a cached Hugging Face folder, written atomically and reused when its config matches."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from toolkit.data import load_texts, texts_fingerprint
from toolkit.errors import CheckpointError
from toolkit.finetune import train
from toolkit.finetune.behaviour import get_behaviour
from toolkit.finetune.train import FinetuneConfig
from toolkit.io import DTYPES, MANIFEST, TMP_PREFIX, atomic_write_json, read_json, write_manifest
from toolkit.models import Model, load_model
from toolkit.paths import cache_dir

log = logging.getLogger(__name__)
INFO_FILE = "finetune.json"


def finetuned_dir(behaviour: str = "pirate", cfg: FinetuneConfig | None = None, base_name: str = "gemma-3-270m") -> Path:
    """Where the fine-tune of the default model lives in the user cache (it may not exist yet)."""
    cfg = cfg or FinetuneConfig(behaviour=behaviour)
    suffix = "" if cfg == FinetuneConfig(behaviour=behaviour) else f"-{cfg.key()}"
    return cache_dir() / f"{base_name}-{behaviour}{suffix}"


def finetuned_ready(folder: str | os.PathLike, cfg: FinetuneConfig, texts_sha256: str | None = None) -> bool:
    """True when `folder` is a complete fine-tune made with `cfg` (manifest present, listed sizes match) and, when
    `texts_sha256` is given, trained on exactly those texts (`toolkit.data.texts_fingerprint`)."""
    folder = Path(folder)
    try:
        manifest = read_json(folder / MANIFEST, "manifest")
        info = read_json(folder / INFO_FILE, "fine-tune info")
    except CheckpointError:
        return False
    if info.get("config") != cfg.to_dict():
        return False
    if texts_sha256 is not None and info.get("texts_sha256") != texts_sha256:
        return False  # trained on another corpus (e.g. before the default corpus changed): never reused
    files = manifest.get("files", {})
    return bool(files) and all((folder / n).is_file() and (folder / n).stat().st_size == e["bytes"]
                               for n, e in files.items())


def prepare_finetuned(behaviour: str = "pirate", *, cfg: FinetuneConfig | None = None, base: str | Model = "default",
                      folder: str | os.PathLike | None = None, texts: Sequence[str] | None = None,
                      progress: bool = True) -> Path:
    """Make (once) and return the folder of `base` fine-tuned with `behaviour`; later calls reuse it.

    `base` is "default" (the embedded Gemma 3 270M, loaded fresh in fp32) or a Model, which is copied, never
    changed. The folder is built under a temp name and renamed into place with its manifest written last, so
    an interrupted run leaves no folder that looks complete.
    """
    cfg = cfg or FinetuneConfig(behaviour=behaviour)
    if cfg.behaviour != behaviour:
        raise ValueError(f"cfg.behaviour is {cfg.behaviour!r} but behaviour={behaviour!r}")
    if folder is None:
        folder = finetuned_dir(behaviour, cfg) if isinstance(base, str) else \
            cache_dir() / f"{base.name}-{behaviour}-{cfg.key()}"
    folder = Path(folder).expanduser()
    texts = list(texts) if texts is not None else load_texts("default")
    texts_sha256 = texts_fingerprint(texts)
    if finetuned_ready(folder, cfg, texts_sha256):
        return folder
    if isinstance(base, str):
        if base != "default":
            raise ValueError(f"base must be 'default' or a Model, got {base!r}")
        model = load_model("default", device="cpu", dtype=torch.float32, progress=progress)
    else:
        hf = copy.deepcopy(base.hf).float()
        model = dataclasses.replace(base, hf=hf, nn=None)
    result = train.finetune(model, cfg, texts=texts, progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{TMP_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        model.hf.to(DTYPES[cfg.save_dtype]).save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, {
            "config": cfg.to_dict(), "texts_sha256": texts_sha256,
            "behaviour": get_behaviour(behaviour).description, "base": model.name,
            "trained": result.trained, "seconds": round(result.seconds, 1),
            "planted_loss": result.planted_loss, "other_loss": result.other_loss, "keep_loss": result.keep_loss,
        })
        write_manifest(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST))
        if folder.exists() and not finetuned_ready(folder, cfg, texts_sha256):
            shutil.rmtree(folder)  # an incomplete or outdated folder: never trusted
        try:
            os.replace(tmp, folder)
        except OSError:
            if not finetuned_ready(folder, cfg, texts_sha256):  # not another process finishing first
                raise
            log.info("%s was completed by another process; using it", folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_finetuned(behaviour: str = "pirate", *, cfg: FinetuneConfig | None = None, progress: bool = True,
                   device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> Model:
    """The default model fine-tuned with `behaviour` (prepared on first use, a few minutes on CPU), named after
    its folder, e.g. 'gemma-3-270m-pirate'; `model.extra["weights_sha256"]` identifies the exact weights."""
    folder = prepare_finetuned(behaviour, cfg=cfg, progress=progress)
    model = load_model(str(folder), device=device, dtype=dtype, progress=progress)
    model.name = folder.name
    files = read_json(folder / MANIFEST, "manifest")["files"]
    # identifies these exact weights (e.g. to key activation caches): the name stays the same across configs
    model.extra["weights_sha256"] = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return model
