"""Where the toolkit keeps what it builds: the user cache folder and its named subfolders."""

from __future__ import annotations

import os
import re
from pathlib import Path

CACHE_ENV = "TOOLKIT_CACHE_DIR"


def cache_dir() -> Path:
    """The user cache folder: $TOOLKIT_CACHE_DIR, else $XDG_CACHE_HOME/gemma-interp-toolkit, else ~/.cache/…"""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gemma-interp-toolkit"


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
