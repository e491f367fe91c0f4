from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.analysis.diff_view import DiffDetails, model_contributions
from toolkit.config import CrosscoderConfig
from toolkit.crosscoder import Crosscoder, PairedActivations
from toolkit.errors import FeatureIndexError


@pytest.fixture
def setup(tiny):
    d = tiny.d_model
    cc = Crosscoder(CrosscoderConfig(d_in=d, d_sae=32, architecture="relu"), seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 200, (6, 10), generator=g)
    pos = torch.tensor([(c, p) for c in range(6) for p in range(1, 10)])  # no row for position 0 (BOS)
    acts = torch.randn(len(pos), 2, d, generator=g)
    return cc, PairedActivations(acts, tokens=tokens, positions=pos)


def test_contributions_add_up_to_the_pre_activation(setup):
    cc, pairs = setup
    c = model_contributions(cc, pairs.acts[:5], 7)
    pre = cc.pre_activations(cc.normalize(pairs.acts[:5]))[:, 7]
    assert torch.allclose(c.sum(1) + cc.b_enc[7], pre, atol=1e-5)
    with pytest.raises(FeatureIndexError, match=r"0\.\.31"):
        model_contributions(cc, pairs.acts[:5], 32)


def test_details_follow_the_widget_contract(setup, tiny):
    cc, pairs = setup
    details = DiffDetails(cc, pairs, tiny.tokenizer, tiny, k=3, window=(4, 2))
    j = int(cc.encode(pairs.acts).sum(0).argmax())
    d = details(j)
    assert len(d["base"]) == len(d["ft"]) == 3
    for b, f in zip(d["base"], d["ft"], strict=True):
        assert b["tokens"] == f["tokens"] and len(b["acts"]) == len(b["tokens"]) <= 7
        assert min(b["acts"]) >= 0 and min(f["acts"]) >= 0
    assert list(d["lens"]) == ["fine-tune − base promotes", "fine-tune decoder promotes", "base decoder promotes"]
    assert all(len(v) == 8 for v in d["lens"].values())
    toks, contrib = details.context(j, 0, 1)  # window reaches position 0, which has no activation row
    assert contrib.shape == (len(toks), 2) and (contrib[0] == 0).all() and np.abs(contrib[1:]).sum() > 0
    with pytest.raises(ValueError, match="needs pairs with tokens and positions"):
        DiffDetails(cc, PairedActivations(pairs.acts), tiny.tokenizer)


def test_explorer_over_diff_details(setup, tiny):
    from widgets import ModelDiffExplorer

    cc, pairs = setup
    nd = np.linspace(0, 1, 32)
    dx = ModelDiffExplorer(nd, np.zeros(32, np.int8), details=DiffDetails(cc, pairs, tiny.tokenizer, tiny, k=2))
    out = dx._on_details({"latent": 3})
    assert [t for t, _ in out["lens"]][0] == "fine-tune − base promotes" and len(out["base"]) <= 2
