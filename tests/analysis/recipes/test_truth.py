import numpy as np
import pytest
import torch

from toolkit.analysis.probes import Probe
from toolkit.analysis.recipes.truth import (
    continuation_features,
    invented_facts,
    invention_scores,
    steer_with_probe,
    truth_data,
    truth_probes,
)
from toolkit.errors import ArgumentError, EmptyInputError, HookNotFoundError, ShapeMismatchError
from toolkit.tracing import capture

PAIRS = [{"context": f"Anna has {n} cats at home.", "consistent": f"Anna keeps {n} cats.",
          "contradicting": f"Anna keeps {m} dogs."} for n, m in (("two", "nine"), ("three", "eight"),
                                                               ("four", "seven"), ("five", "six"))]


def test_features_pool_only_the_continuation(tiny):
    site = "blocks.1.resid_post"
    f = continuation_features(tiny, ["the cat sat.", "a dog"], ["on the mat", "ran far away"], site)
    assert f[site].shape == (2, 64)
    full = capture(tiny, ["the cat sat. on the mat"], site)[site][0].float()
    n_ctx = len(tiny.tokenize(["the cat sat."])["input_ids"][0])
    assert torch.allclose(f[site][0], full[n_ctx:].mean(0), atol=1e-5)


def test_truth_probes_per_site(tiny):
    t = truth_probes(tiny, PAIRS, ["blocks.0.resid_post", "blocks.1.resid_post"], cv=2)
    assert [p.site for p in t] == ["blocks.0.resid_post", "blocks.1.resid_post"]
    assert all(0 <= p.auroc <= 1 and p.n_pos == p.n_neg == 4 for p in t)
    assert t.best.direction.shape == (64,)


def test_invented_facts_rule():
    ctx = "Maria bought three apples in Paris."
    assert invented_facts(ctx, " She ate three apples in Paris.") == []
    assert invented_facts(ctx, " She ate 7 apples with Tom in Paris.") == ["7", "Tom"]
    assert invented_facts(ctx, " Then five more. Later she slept.") == ["five"]  # "Later" starts a sentence
    assert invention_scores([ctx, ctx, ctx], [" Nothing new.", " With Lisa.", "\n\n"]) == [0.0, 1.0, 0.0]
    with pytest.raises(ShapeMismatchError):
        invention_scores([ctx], [])


def test_steering_sweep_on_tiny(tiny):
    p = Probe("blocks.0.resid_post", "continuation", 1.0, 1.0, 1.0, torch.nn.functional.normalize(torch.randn(64), dim=0),
              None)
    t = steer_with_probe(tiny, p, ["Anna has two cats.", "Tom lives in Rome."], [-1.0, 0.0], max_new_tokens=4,
                         progress=False)
    assert len(t) == 4 and set(t["invents"]) <= {0.0, 1.0}


def test_bad_input(tiny):
    with pytest.raises(EmptyInputError):
        truth_probes(tiny, [], ["blocks.0.resid_post"])
    with pytest.raises(ArgumentError, match="at least 2"):
        truth_probes(tiny, PAIRS[:1], ["blocks.0.resid_post"])
    with pytest.raises(ArgumentError, match="lack"):
        truth_probes(tiny, [{"context": "a"}] * 2, ["blocks.0.resid_post"])
    with pytest.raises(ShapeMismatchError):
        continuation_features(tiny, ["a b", "c d"], ["e"], "blocks.0.resid_post")
    with pytest.raises(EmptyInputError):
        continuation_features(tiny, ["a b"], [""], "blocks.0.resid_post")
    with pytest.raises(EmptyInputError):
        continuation_features(tiny, ["a b"], ["c"], [])
    with pytest.raises(HookNotFoundError):
        continuation_features(tiny, ["a b"], ["c"], "blocks.9.resid_post")


def test_one_class_and_non_finite_reach_the_probe(tiny):
    from toolkit.analysis.probes import train_probe
    from toolkit.errors import NonFiniteError

    X = np.random.default_rng(0).normal(size=(8, 4))
    with pytest.raises(ValueError, match="two classes"):
        train_probe(X, np.ones(8))
    X[0, 0] = np.inf
    with pytest.raises(NonFiniteError):
        train_probe(X, np.r_[np.ones(4), np.zeros(4)])


def test_written_data():
    pairs = truth_data()
    assert len(pairs) == 40 and all(p["consistent"] != p["contradicting"] for p in pairs)
