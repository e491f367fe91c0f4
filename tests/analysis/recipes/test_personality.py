import pytest
import torch

from toolkit.analysis.recipes.personality import (
    answer_pairs,
    is_monotone,
    personality_data,
    personality_sweep,
    purify,
    strength_summary,
    trait_judges,
    trait_vector,
)
from toolkit.analysis.table import Table
from toolkit.errors import ArgumentError, EmptyInputError, NonFiniteError, ShapeMismatchError

TRIPLES = [("Do you like parties?", "Yes, I love crowds.", "No, I stay home."),
           ("Weekend plans?", "Dancing with friends.", "Reading alone.")]


def test_vector_is_unit_mean_difference(tiny):
    from toolkit.analysis.steering import pair_differences

    v = trait_vector(tiny, "blocks.0.attn_out", TRIPLES)
    want = pair_differences(tiny, "blocks.0.attn_out", answer_pairs(TRIPLES)).mean(0)
    assert torch.allclose(v, want / want.norm(), atol=1e-6) and v.norm() == pytest.approx(1.0)


def test_purify_is_orthogonal_and_keeps_the_rest():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(32, generator=g) for _ in range(3))
    p = purify(a, [b, c])
    assert abs(float(p @ b)) < 1e-5 and abs(float(p @ c)) < 1e-5 and p.norm() == pytest.approx(1.0)
    assert float(p @ a) > 0
    orth = torch.zeros(32)
    orth[0], b2 = 1.0, torch.zeros(32)
    b2[1] = 1.0
    assert torch.allclose(purify(orth, [b2]), orth)  # already orthogonal: unchanged


def test_purify_bad_input():
    v = torch.ones(4)
    with pytest.raises(EmptyInputError):
        purify(v, [])
    with pytest.raises(ShapeMismatchError):
        purify(v, [torch.ones(5)])
    with pytest.raises(NonFiniteError):
        purify(v, [torch.tensor([1.0, float("nan"), 0.0, 0.0])])
    with pytest.raises(ArgumentError, match="span"):
        purify(v, [2 * v])


def test_sweep_and_summary_on_tiny(tiny):
    judges = trait_judges({"x": {"high": ["I love crowds and parties", "friends everywhere"],
                                 "low": ["I stay home alone", "quiet reading alone"]}})
    v = trait_vector(tiny, "blocks.0.resid_post", TRIPLES)
    t = personality_sweep(tiny, v, "blocks.0.resid_post", ["Question: hi\nAnswer:", "Question: so\nAnswer:"],
                          [-1.0, 0.0, 1.0], judges, max_new_tokens=4, progress=False)
    assert {"p_x", "clean"} <= set(t.columns) and len(t) == 6
    s = strength_summary(t, min_clean=0.0)
    assert s["strength"] == [-1.0, 0.0, 1.0] and all(s["in_clean_range"])


def test_summary_clean_range_is_contiguous_around_zero():
    rows = [{"strength": s, "p_x": 0.5, "clean": c} for s, c in ((-2, 1.0), (-1, 0.0), (0, 1.0), (1, 1.0), (2, 0.0))]
    s = strength_summary(Table(rows))
    assert s["in_clean_range"] == [False, False, True, True, False]  # -2 is clean but cut off by -1
    with pytest.raises(EmptyInputError):
        strength_summary(Table([]))


def test_monotone_and_bad_input(tiny):
    assert is_monotone([0.1, 0.2, 0.2, 0.5]) and not is_monotone([0.1, 0.3, 0.2])
    assert is_monotone([0.1, 0.3, 0.29], tol=0.02) and is_monotone([3, 2, 1], increasing=False)
    with pytest.raises(ArgumentError):
        is_monotone([1.0])
    with pytest.raises(EmptyInputError):
        trait_vector(tiny, "blocks.0.resid_post", [])
    with pytest.raises(ArgumentError, match="triples"):
        trait_vector(tiny, "blocks.0.resid_post", [("q", "a")])
    with pytest.raises(EmptyInputError):
        trait_judges({})
    with pytest.raises(EmptyInputError):
        trait_judges({"x": {"high": [], "low": ["a"]}})


def test_written_data():
    d = personality_data()
    assert set(d["traits"]) == {"openness", "conscientiousness", "extraversion"}
    assert all(len(t["triples"]) >= 10 and len(t["high"]) >= 10 for t in d["traits"].values())
