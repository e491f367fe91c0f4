"""circuitsvis through the toolkit's helper renders offline: no network call, no CDN reference."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest

from widgets.circuits import attention_heads


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network call attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


def test_attention_view_is_inline_and_never_probes_the_network(no_network):
    tokens = ["<bos>", "The", " cat", " sat"]
    pattern = np.tril(np.ones((2, 4, 4), dtype=np.float32))
    pattern /= pattern.sum(-1, keepdims=True)
    view = attention_heads(tokens, pattern)
    html = view._repr_html_()
    assert "CircuitsVis.render" in html and "AttentionHeads" in html
    assert "unpkg" not in html and "https://" not in html.split("CircuitsVis.render")[1]
    assert " cat" in html
    assert no_network == []


def test_attention_view_rejects_bad_patterns():
    with pytest.raises(ValueError, match=r"\(heads, 3, 3\)"):
        attention_heads(["a", "b", "c"], np.zeros((2, 3, 4)))
    bad = np.zeros((1, 2, 2))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        attention_heads(["a", "b"], bad)
    with pytest.raises(ValueError, match="1 head names for 2 heads"):
        attention_heads(["a", "b"], np.zeros((2, 2, 2)), head_names=["x"])
