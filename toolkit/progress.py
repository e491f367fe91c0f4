"""Progress bars for long jobs: tqdm.auto (a widget in Jupyter), refreshed at a bounded rate.

Every notebook-bar refresh is a few kernel messages. tqdm's default (up to 10 refreshes a second) plus a
postfix forced on every step floods the kernel's IOPub channel in a long cell; a client that reads it
late (nbval reads it only after the cell ends) then loses messages, the cell's closing "idle" among them.
So bars here refresh at most every `mininterval()` seconds; callers set postfixes with refresh=False.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

DEFAULT_MININTERVAL = 0.5


def mininterval() -> float:
    """Seconds between refreshes: `TQDM_MININTERVAL` when set (tqdm's own knob), else 0.5.

    Read at each call: tqdm itself reads it once, when tqdm is imported."""
    raw = os.environ.get("TQDM_MININTERVAL")
    if raw is None:
        return DEFAULT_MININTERVAL
    try:
        return max(float(raw), 0.0)
    except ValueError:
        raise ValueError(f"TQDM_MININTERVAL must be a number of seconds, got {raw!r}") from None


def progress_bar(iterable: Iterable | None = None, *, desc: str, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm.auto bar that refreshes at most every `mininterval()` seconds; off when `enabled` is false."""
    kwargs.setdefault("mininterval", mininterval())
    return tqdm(iterable, desc=desc, disable=not enabled, **kwargs)

