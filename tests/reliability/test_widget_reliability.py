"""Reliability case 15 (widget half): a payload with NaN or over the size cap is rejected in Python, with an
error naming what was wrong, before anything is synced to the page."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.errors import NonFiniteError
from widgets import FeatureExplorer, ModelDiffExplorer, PayloadError, SteeringPanel


def test_nan_in_widget_arrays_is_rejected_before_sync(monkeypatch):
    from widgets._base import Widget

    opened = []
    monkeypatch.setattr(Widget, "open", lambda self: opened.append(self))  # a comm would open here
    d = np.full(100, 0.01, np.float32)
    d[7] = np.nan
    with pytest.raises(NonFiniteError, match=r"density has 1 NaN/inf values \(first at index 7\)"):
        FeatureExplorer(d, np.ones(100), lambda i: {})
    with pytest.raises(NonFiniteError, match="norm_diff has 1 NaN/inf"):
        ModelDiffExplorer(d, np.zeros(100, np.int8))
    with pytest.raises(PayloadError, match="strength must be a finite number"):
        SteeringPanel([{"kind": "vector", "name": "v", "site": "blocks.0.resid_post", "strength": float("inf")}],
                      lambda items, prompt: {})
    assert opened == []


def test_oversized_payloads_are_rejected(monkeypatch):
    from widgets._base import Widget

    sent = []
    monkeypatch.setattr(Widget, "send", lambda self, content, buffers=None: sent.append((content, buffers or [])))
    big = np.full(300_000, 0.01, np.float32)
    with pytest.raises(PayloadError, match="over the widget's cap of 2.0 MiB"):
        FeatureExplorer(big, big, lambda i: {}, max_bytes=2 * 2**20)
    fx = FeatureExplorer(big[:10], big[:10], lambda i: {"top": [{"tokens": ["a"] * 300_000,
                                                                 "acts": np.ones(300_000)}]}, max_bytes=2**20)
    fx._handle_custom_msg({"type": "details", "id": 1, "latent": 0}, [])
    content, buffers = sent[-1]
    assert content["type"] == "error" and "over the widget's cap" in content["message"] and buffers == []
