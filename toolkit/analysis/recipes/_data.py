"""The recipes' hand-written data sets: JSON files in `data/` beside this module, each with a `how_made` line."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from toolkit.errors import ArgumentError

DATASETS = ("mosaic", "truth", "personality", "corrsteer", "unlearning", "detox")


def load_data(name: str) -> dict[str, Any]:
    """The parsed JSON of data set `name` (one of DATASETS); `["how_made"]` says how it was written."""
    if name not in DATASETS:
        raise ArgumentError(f"no recipe data set {name!r}; choose one of {', '.join(DATASETS)}")
    path = resources.files("toolkit.analysis.recipes").joinpath("data", f"{name}.json")
    if not path.is_file():
        raise ArgumentError(f"recipe data set {name!r} is not written yet (no data/{name}.json)")
    return json.loads(path.read_text(encoding="utf-8"))
