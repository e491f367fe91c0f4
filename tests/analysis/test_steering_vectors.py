"""Vector builders, measured units and the sweep on the tiny Gemma-2."""

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from toolkit.analysis.steering import (
    LatentSteer,
    SteeringSpec,
    VectorSteer,
    caa,
    diffmean,
    latent_unit,
    pca_direction,
    probe_direction,
    projection_scores,
    site_unit,
    sweep,
)
from toolkit.analysis.table import Table
from toolkit.config import SAEConfig
from toolkit.errors import ShapeMismatchError
from toolkit.sae import SAE
from toolkit.tracing import capture

SITE = "blocks.1.resid_post"
POS = ["The cat sat on the mat", "The quick brown fox", "the lazy dog"]
NEG = ["Water boils at one hundred degrees", "Paris is the capital of France", "Numbers: 0 1 2 3"]
PAIRS = list(zip(POS, NEG, strict=True))


def test_diffmean_is_the_unit_difference_of_token_means(tiny):
    d = diffmean(tiny, SITE, POS, NEG)
    mp = capture(tiny, POS, SITE).tokens_only(SITE).mean(0)
    mn = capture(tiny, NEG, SITE).tokens_only(SITE).mean(0)
    torch.testing.assert_close(d, (mp - mn) / (mp - mn).norm())
    s_pos, s_neg = projection_scores(tiny, SITE, d, POS), projection_scores(tiny, SITE, d, NEG)
    assert s_pos.shape == (3,) and s_pos.mean() > s_neg.mean()
    assert projection_scores(tiny, SITE, d, POS, pool="mean").shape == (3,)


def test_caa_and_pca_read_the_last_token(tiny):
    v = caa(tiny, SITE, PAIRS)
    pa, na = capture(tiny, POS, SITE), capture(tiny, NEG, SITE)
    last = lambda a: a[SITE][torch.arange(3), a.attention_mask.sum(1) - 1]  # noqa: E731
    diffs = last(pa) - last(na)
    torch.testing.assert_close(v, diffs.mean(0))
    p = pca_direction(tiny, SITE, PAIRS)
    assert abs(float(p.norm()) - 1) < 1e-5 and float(p @ diffs.mean(0)) > 0
    _, _, vh = torch.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
    assert abs(abs(float(p @ vh[0])) - 1) < 1e-4


def test_probe_direction_from_sklearn_and_arrays():
    x = torch.randn(40, 64)
    y = (x[:, 0] > 0).long()
    clf = LogisticRegression().fit(x.numpy(), y.numpy())
    d = probe_direction(clf, width=64)
    assert abs(float(d.norm()) - 1) < 1e-5 and d.argmax() == 0
    torch.testing.assert_close(probe_direction(torch.ones(1, 4)), torch.full((4,), 0.5))
    with pytest.raises(ShapeMismatchError, match="width 64, the site has width 32"):
        probe_direction(clf, width=32)


def test_units_are_measured(tiny):
    texts = POS + NEG
    acts = capture(tiny, texts, SITE).tokens_only(SITE)
    assert site_unit(tiny, SITE, texts) == pytest.approx(float(acts.norm(dim=-1).median()))
    sae = SAE.from_config(SAEConfig(d_in=64, d_sae=64, architecture="topk", k=8, site=SITE), seed=0)
    codes = sae.encode(acts).detach()
    live = int(codes.max(0).values.argmax())
    assert latent_unit(tiny, sae, live, texts) == pytest.approx(float(codes[:, live].max()))
    dead = [i for i in range(64) if codes[:, i].max() <= 0]
    if dead:
        with pytest.raises(ValueError, match="never fire"):
            latent_unit(tiny, sae, dead[0], texts)


def test_sweep_is_generation_per_strength_with_scores(tiny):
    v = diffmean(tiny, SITE, POS, NEG)
    sae = SAE.from_config(SAEConfig(d_in=64, d_sae=64, architecture="topk", k=8, site=SITE), seed=0)
    spec = SteeringSpec([VectorSteer(v, SITE, "add", 1.0, unit=20.0, name="dm"), LatentSteer(sae, 3, "add", 1.0)])
    seen = []

    def length(prompts, gens):
        seen.append(len(gens))
        return [len(g) for g in gens]
    prompts = ["The cat", "Paris is", "Water"]
    t = sweep(tiny, prompts, spec, [0.0, 2.0], names="dm", scores={"len": length}, max_new_tokens=4,
              batch_size=2, progress=False)
    assert isinstance(t, Table) and len(t) == 6 and t.columns == ["strength", "prompt_id", "prompt", "generation", "len"]
    assert seen == [3, 3] and t["len"] == [len(g) for g in t["generation"]]
    at2 = spec.with_strength(2.0, "dm").generate(tiny, prompts, max_new_tokens=4)
    assert t.where(strength=2.0)["generation"] == at2
    assert t.group_mean("strength", "len")["n"] == [3, 3]
    assert "<table>" in t._repr_html_() and "strength" in repr(t)
