import numpy as np
import pytest
import torch

from toolkit.analysis.probes import ProbeTable, pool, pooled_features, probe_sites, train_probe
from toolkit.config import SAEConfig
from toolkit.errors import EmptyInputError, HookNotFoundError, NonFiniteError, ShapeMismatchError
from toolkit.sae.sae import SAE
from toolkit.tracing import capture

SITES = ["blocks.0.resid_post", "blocks.1.resid_post"]
POS = [f"the cat {w} on the mat" for w in ("sat", "slept", "ran", "purred", "stood", "lay", "ate", "hid")]
NEG = [f"the dog {w} in the park" for w in ("sat", "slept", "ran", "barked", "stood", "lay", "ate", "hid")]


def test_pool_last_mean_max():
    acts = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(pool(acts, mask, "last"), torch.stack([acts[0, 2], acts[1, 1]]))
    assert torch.equal(pool(acts, mask, "mean"), torch.stack([acts[0, 1:].mean(0), acts[1, 1]]))
    assert torch.equal(pool(-acts, mask, "max"), torch.stack([-acts[0, 1], -acts[1, 1]]))
    with pytest.raises(ValueError, match="pooling"):
        pool(acts, mask, "median")
    with pytest.raises(ShapeMismatchError):
        pool(acts, mask[:, :2])
    with pytest.raises(EmptyInputError, match="no position"):
        pool(acts, torch.zeros(2, 3, dtype=torch.bool))


def test_probe_recovers_a_planted_direction_in_raw_units():
    g = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.1, 50, 16)  # features on very different scales (like Gemma's outlier dims)
    X = torch.randn(200, 16, generator=g) * scales
    true = torch.zeros(16)
    true[3] = 1.0
    y = (X[:, 3] > 0).long()
    p = train_probe(X, y, cv=4, site="s", pooling="mean")
    assert p.auroc > 0.97 and p.f1 > 0.9 and p.n_pos + p.n_neg == 200
    assert p.direction.norm() == pytest.approx(1.0) and float(p.direction @ true) > 0.95
    assert p.decision(X[:5]).shape == (5,)
    dec = torch.eye(16)[:, :8].T.contiguous()  # 16 "codes" can't map through an 8-row decoder
    with pytest.raises(ShapeMismatchError, match="decoder"):
        train_probe(X, y, decoder=dec)


def test_probe_errors():
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="two classes"):
        train_probe(X, np.ones(10))
    with pytest.raises(ShapeMismatchError, match="one label per row"):
        train_probe(X, np.r_[np.ones(5), np.zeros(4)])
    with pytest.raises(EmptyInputError):
        train_probe(np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(ValueError, match="at least 2"):
        train_probe(X, np.r_[1, np.zeros(9)])
    X[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="1 of 30 values are non-finite"):
        train_probe(X, np.r_[np.ones(5), np.zeros(5)])


def test_probe_sites_on_the_tiny_model(tiny):
    table = probe_sites(tiny, POS, NEG, SITES, pooling="mean", cv=4)
    assert isinstance(table, ProbeTable) and [p.site for p in table] == SITES
    text = repr(table)  # plain text: one row per site, never the direction tensors
    assert all(s in text for s in SITES) and "auroc_cv" in text and "tensor" not in text
    assert all(p.auroc > 0.9 for p in table), [p.auroc for p in table]  # "cat" vs "dog" is in every token's stream
    assert table.best.direction.shape == (64,) and "<table>" in table._repr_html_()
    feats = pooled_features(tiny, POS[:2], SITES[1], pooling="last")
    want = torch.stack([capture(tiny, t, SITES[1])[SITES[1]][0, -1] for t in POS[:2]])
    assert torch.allclose(feats[SITES[1]], want.float(), atol=1e-5)  # padding never counts as the last token


def test_probe_on_sae_codes_maps_to_the_site(tiny):
    sae = SAE.from_config(SAEConfig(d_in=64, d_sae=48, architecture="relu", site=SITES[1]), seed=0)
    (p,) = probe_sites(tiny, POS, NEG, SITES[1], pooling="max", sae=sae, cv=3)
    assert p.direction.shape == (64,) and p.direction.norm() == pytest.approx(1.0)
    w = torch.tensor(p.classifier[-1].coef_[0], dtype=torch.float32)
    want = w @ (sae.W_dec / sae.input_scale).detach()
    assert torch.allclose(p.direction, want / want.norm(), atol=1e-5)


def test_probe_sites_errors(tiny):
    with pytest.raises(EmptyInputError, match="negatives"):
        probe_sites(tiny, POS, [], SITES)
    with pytest.raises(TypeError, match="list of strings"):
        probe_sites(tiny, "a cat", NEG, SITES)
    with pytest.raises(EmptyInputError):
        probe_sites(tiny, POS + [" "], NEG, SITES)
    with pytest.raises(ValueError, match="pooling"):
        pooled_features(tiny, POS, SITES, pooling="sum")
    with pytest.raises(HookNotFoundError, match="layer 9"):
        probe_sites(tiny, POS, NEG, "blocks.9.resid_post")
