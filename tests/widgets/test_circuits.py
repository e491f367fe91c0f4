from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest

from widgets.circuits import OfflineHTML, attention_heads, offline


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) any attempt to open a connection or URL."""
    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append(repr(args[:2]))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


def test_attention_heads_render_inline_without_network(no_network):
    att = np.tril(np.ones((2, 4, 4), np.float32))
    att /= att.sum(-1, keepdims=True)
    view = attention_heads(att, ["<bos>", "The", " cat", " sat"])
    html = view._repr_html_()
    assert isinstance(view, OfflineHTML) and repr(view) == "AttentionHeads(2 heads × 4 tokens)"
    assert "unpkg.com" not in html and "https://" not in html.split("<script")[0]
    assert len(html) > 100_000  # the bundled script is inlined
    assert no_network == []


def test_offline_patches_every_circuitsvis_render(no_network):
    import circuitsvis.tokens
    import circuitsvis.utils.render as render

    offline()
    out = circuitsvis.tokens.colored_tokens(["a", "b"], [0.1, 0.9])._repr_html_()
    assert render.internet_on() is False and "unpkg.com" not in out and no_network == []


def test_attention_shape_errors():
    with pytest.raises(ValueError, match=r"attention must be \(heads, 3, 3\)"):
        attention_heads(np.zeros((2, 4, 4)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        attention_heads(np.full((1, 2, 2), np.nan), ["a", "b"])


def test_attention_of_the_tiny_model(tiny, no_network):
    import torch

    batch = tiny.tokenize("The cat sat")
    with torch.no_grad():
        out = tiny.hf(**batch, output_attentions=True)
    tokens = tiny.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    view = attention_heads(out.attentions[0][0], tokens)
    assert repr(view).startswith(f"AttentionHeads({out.attentions[0].shape[1]} heads") and no_network == []
