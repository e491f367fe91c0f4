from __future__ import annotations

import numpy as np
import pytest

from tests.widgets.backends import KNOWN, DiffTableLike, diff_details
from tests.widgets.conftest import page
from toolkit.errors import NonFiniteError
from widgets import ModelDiffExplorer, PayloadError


@pytest.fixture
def table():
    return DiffTableLike(1024)


def test_from_table_sends_valid_mask_not_nan(table):
    dx = ModelDiffExplorer.from_table(table, diff_details)
    nu = np.frombuffer(dx.nu_error, np.float32)
    valid = np.frombuffer(dx.valid, np.uint8).astype(bool)
    assert np.isfinite(nu).all()
    assert np.array_equal(valid, np.isfinite(table.nu_error))
    assert np.array_equal(nu[valid], table.nu_error[valid].astype(np.float32)) and (nu[~valid] == 0).all()
    assert dx.kind_names == ["base-only", "shared", "ft-only", "other"]
    codes = np.frombuffer(dx.kind, np.int8)
    assert [dx.kind_names[c] for c in codes[:20]] == list(table.cls[:20])
    assert repr(dx) == "ModelDiffExplorer(1024 latents, selected=-1)"


def test_counts_match_the_table(table):
    dx = ModelDiffExplorer.from_table(table)
    c = dx.counts()
    assert c == {**{k: int((table.cls == k).sum()) for k in dx.kind_names}, "artifact": int(table.artifact.sum())}
    assert sum(c[k] for k in dx.kind_names) == 1024


def test_brush_and_chips_filter(table):
    dx = ModelDiffExplorer.from_table(table)
    assert len(dx.visible()) == 1024
    dx.set_state({"brush": [0.9, 1.0]})
    assert np.array_equal(dx.visible(), np.nonzero((table.norm_diff >= 0.9) & (table.norm_diff <= 1.0))[0])
    dx.set_state({"classes": ["artifact"]})
    assert np.array_equal(dx.visible(), np.nonzero(table.artifact & (table.norm_diff >= 0.9))[0])
    with pytest.raises(ValueError, match="unknown classes"):
        dx.classes = ["chat-only"]
    with pytest.raises(ValueError, match=r"brush must be \[\] or \[lo, hi\]"):
        dx.brush = [0.5, 0.1]


def test_rejects_nan_and_bad_kinds(table):
    with pytest.raises(NonFiniteError, match="nu_error has"):
        ModelDiffExplorer(table.norm_diff, table.cls, nu_error=table.nu_error, nu_recon=table.nu_recon)
    with pytest.raises(PayloadError, match="not in kind_names"):
        ModelDiffExplorer(table.norm_diff, np.array(["chat"] * 1024))
    with pytest.raises(PayloadError, match=r"kind codes must be in 0\.\.3"):
        ModelDiffExplorer(table.norm_diff, np.full(1024, 7))
    with pytest.raises(PayloadError, match="one entry per latent"):
        ModelDiffExplorer(table.norm_diff, table.cls[:3])


def test_details_side_by_side(table, sent):
    dx = ModelDiffExplorer.from_table(table, diff_details)
    page(dx, {"type": "details", "id": 1, "latent": KNOWN})
    content, bufs = sent[-1]
    d = content["data"]
    assert d["latent"] == KNOWN and len(d["base"]) == len(d["ft"]) == 3
    assert d["base"][0]["tokens"] == d["ft"][0]["tokens"]
    assert d["lens"][0][0] == "promoted" and d["lens"][0][1][0] == [" up0", 1.0]
    assert len(bufs) == 6


def test_from_real_diff_table():
    """The adapter reads a real DiffTable (random crosscoder, random activations: some ratios are NaN)."""
    import torch

    from toolkit.analysis.diff import diff_table
    from toolkit.config import CrosscoderConfig
    from toolkit.crosscoder import Crosscoder

    cc = Crosscoder(CrosscoderConfig(d_in=16, d_sae=64, architecture="relu"), seed=0)
    t = diff_table(cc, torch.randn(256, 2, 16))
    dx = ModelDiffExplorer.from_table(t)
    assert dx.counts() == t.counts()
    assert np.array_equal(np.frombuffer(dx.valid, np.uint8).astype(bool),
                          np.isfinite(t.nu_error) & np.isfinite(t.nu_recon))
