"""circuitsvis views rendered fully offline (for standalone cells, e.g. attention patterns).

circuitsvis decides per render whether to load its JavaScript from a CDN by probing http://google.com
(`circuitsvis.utils.render.internet_on`): up to a second blocked per render where packets are dropped, and, when the
kernel is online but the browser is not (Binder), a blank cell. `offline()` replaces the probe so every circuitsvis
render in this kernel inlines its bundled script; the helpers below call it and return the inlined HTML."""

from __future__ import annotations

from typing import Any

import numpy as np


def offline() -> None:
    """Make circuitsvis render from its bundled script, never probing the network (idempotent)."""
    import circuitsvis.utils.render as render

    render.internet_on = _no_internet


def _no_internet() -> bool:
    return False


class OfflineHTML:
    """Inlined circuitsvis HTML with a stable text form (nbval and readers without JavaScript see the text)."""

    def __init__(self, html: str, text: str) -> None:
        self.html, self.text = html, text

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text


def attention_heads(attention: Any, tokens: list[str], *, head_names: list[str] | None = None,
                    **kwargs: Any) -> OfflineHTML:
    """circuitsvis' attention-heads view of `attention` (heads, query, key) over `tokens`, offline."""
    att = np.asarray(attention.detach().float().cpu() if hasattr(attention, "detach") else attention, np.float32)
    if att.ndim != 3 or att.shape[1] != len(tokens) or att.shape[2] != len(tokens):
        raise ValueError(f"attention must be (heads, {len(tokens)}, {len(tokens)}) for {len(tokens)} tokens, "
                         f"got shape {att.shape}")
    if not np.isfinite(att).all():
        raise ValueError("attention holds NaN/inf values")
    offline()
    from circuitsvis.attention import attention_heads as view

    names = head_names or [f"head {h}" for h in range(att.shape[0])]
    rendered = view(attention=att, tokens=[str(t) for t in tokens], attention_head_names=names, **kwargs)
    return OfflineHTML(rendered._repr_html_(), f"AttentionHeads({att.shape[0]} heads × {len(tokens)} tokens)")
