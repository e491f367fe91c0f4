"""Where the toolkit keeps what it builds: the user cache folder and its named subfolders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from toolkit.errors import CacheError

CACHE_ENV = "TOOLKIT_CACHE_DIR"


def cache_dir() -> Path:
    """The user cache folder: $TOOLKIT_CACHE_DIR, else $XDG_CACHE_HOME/gemma-interp-toolkit, else ~/.cache/…

    CacheError when that path (or a folder above it) is a file, before anything is read or written there."""
    if os.environ.get(CACHE_ENV):
        path, how = Path(os.environ[CACHE_ENV]).expanduser(), f"${CACHE_ENV}"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path, how = Path(base).expanduser() / "gemma-interp-toolkit", "the default cache folder"
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise CacheError(f"the toolkit cache folder {path} ({how}) cannot be used: {p} is a file, not a folder; "
                             f"remove the file or set {CACHE_ENV} to a folder")
    return path


def slug(text: str) -> str:
    """`text` as one safe folder name (runs of other characters become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def activations_dir() -> Path:
    """Cached activations: activations/<model>/<site>/<corpus key>."""
    return cache_dir() / "activations"


def saes_dir() -> Path:
    """Trained SAEs of the zoo: saes/<model>/<site>/<corpus key>/<settings>."""
    return cache_dir() / "saes"


def crosscoders_dir() -> Path:
    """Trained crosscoders: crosscoders/<base>__<fine-tuned>/<site>/<settings>."""
    return cache_dir() / "crosscoders"
