"""circuitsvis views rendered fully offline.

circuitsvis decides between inlining its 1.3 MB bundle and loading it from a CDN by probing
http://google.com on every render; here the probe is replaced and only the inlined source is ever shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class OfflineHTML:
    """HTML whose scripts are all inline: renders in Jupyter without touching the network."""

    def __init__(self, html: str) -> None:
        self.html = html

    def _repr_html_(self) -> str:
        return self.html

    def __html__(self) -> str:
        return self.html


def offline_circuitsvis() -> Any:
    """Import circuitsvis with its internet probe disabled (idempotent); returns the module."""
    import circuitsvis
    import circuitsvis.utils.render as render

    render.internet_on = lambda: False
    return circuitsvis


def attention_heads(tokens: Sequence[str], pattern: Any, *, head_names: Sequence[str] | None = None) -> OfflineHTML:
    """circuitsvis's attention-heads view of a `(heads, q, k)` pattern over `tokens`, offline."""
    arr = np.asarray(pattern.detach().cpu() if hasattr(pattern, "detach") else pattern, dtype=np.float32)
    n = len(tokens)
    if arr.ndim != 3 or arr.shape[1:] != (n, n):
        raise ValueError(f"pattern must be (heads, {n}, {n}) for {n} tokens; got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"pattern holds {int((~np.isfinite(arr)).sum())} non-finite values")
    names = list(head_names) if head_names is not None else [f"head {h}" for h in range(arr.shape[0])]
    if len(names) != arr.shape[0]:
        raise ValueError(f"{len(names)} head names for {arr.shape[0]} heads")
    cv = offline_circuitsvis()
    view = cv.attention.attention_heads(attention=arr, tokens=[t.replace("▁", " ") for t in tokens],
                                        attention_head_names=names)
    return OfflineHTML(view.local_src)
