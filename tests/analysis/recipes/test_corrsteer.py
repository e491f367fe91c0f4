import numpy as np
import pytest
import torch

from toolkit.analysis.recipes.corrsteer import (
    Pearson,
    Pick,
    accuracy_table,
    answers,
    corrsteer_data,
    last_codes,
    mc_prompt,
    prune,
    random_pick,
    select,
)
from toolkit.errors import (
    ArgumentError,
    EmptyInputError,
    FeatureIndexError,
    NonFiniteError,
    ShapeMismatchError,
)

ITEMS = [{"question": f"Which is {w}?", "options": [w, "stone", "cloud"], "answer": "A"} for w in ("red", "big", "new")]


def test_prompt_format():
    assert mc_prompt(ITEMS[0]) == "Question: Which is red?\nA. red\nB. stone\nC. cloud\nAnswer:"
    with pytest.raises(ArgumentError):
        mc_prompt({"question": "q", "options": ["x"], "answer": "A"})
    with pytest.raises(ArgumentError):
        mc_prompt({"question": "q", "options": ["x", "y"], "answer": "C"})


def test_pearson_matches_numpy_in_chunks():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 6)), rng.integers(0, 2, 50)
    X[:, 5] = 0.0  # a dead latent: correlation 0, not NaN
    p = Pearson(6)
    for i in range(0, 50, 7):
        p.update(X[i:i + 7], y[i:i + 7])
    want = [np.corrcoef(X[:, j], y)[0, 1] for j in range(5)]
    assert np.allclose(p.result()[:5], want) and p.result()[5] == 0.0


def test_pearson_bad_input():
    p = Pearson(3)
    with pytest.raises(EmptyInputError):
        p.result()
    with pytest.raises(ShapeMismatchError):
        p.update(np.ones((4, 2)), np.ones(4))
    with pytest.raises(NonFiniteError):
        p.update(np.full((2, 3), np.nan), np.ones(2))
    p.update(np.random.default_rng(0).normal(size=(4, 3)), np.ones(4))
    with pytest.raises(ArgumentError, match="one class"):
        p.result()


def test_select_picks_the_planted_latent(tiny_sae):
    codes = torch.rand(40, 48) * 0.1
    y = np.r_[np.ones(20), np.zeros(20)]
    codes[:20, 7] += 2.0
    codes[20:, 9] += 1.0
    pos, neg = select(codes, y, tiny_sae), select(codes, y, tiny_sae, negative=True)
    assert pos.latent == 7 and pos.corr > 0.9 and pos.coefficient == pytest.approx(float(codes[:20, 7].mean()))
    assert neg.latent == 9 and neg.corr < -0.9
    r = random_pick(pos)
    assert r.latent != 7 and 0 <= r.latent < 48 and r.coefficient == pos.coefficient
    with pytest.raises(ShapeMismatchError):
        select(codes[:, :10], y, tiny_sae)


def test_steering_changes_letter_logits(tiny, tiny_sae):
    codes = last_codes(tiny, tiny_sae, ITEMS)
    assert codes.shape == (3, 48)
    base = answers(tiny, ITEMS)
    assert base.shape == (3,) and set(base.tolist()) <= {0, 1}
    big = Pick(tiny_sae, 3, 1.0, 1e4)
    t = accuracy_table(tiny, ITEMS, {"baseline": [], "huge": [big.edit()]})
    assert t["condition"] == ["baseline", "huge"] and all(0 <= a <= 1 for a in t["accuracy"])
    with pytest.raises(EmptyInputError):
        answers(tiny, [])
    with pytest.raises(EmptyInputError):
        accuracy_table(tiny, ITEMS, {})


def test_latent_out_of_range(tiny_sae):
    from toolkit.analysis.steering import LatentSteer

    with pytest.raises(FeatureIndexError):
        LatentSteer(tiny_sae, 48)
    with pytest.raises(FeatureIndexError):
        Pick(tiny_sae, 48, 0.0, 1.0)
    with pytest.raises(NonFiniteError):
        Pick(tiny_sae, 1, 0.0, float("nan"))


def test_written_data():
    items = corrsteer_data()
    assert len(items) >= 150 and {i["answer"] for i in items} == {"A", "B", "C"}
    assert all(len(i["options"]) == 3 for i in items)


def test_batched_answers_equal_one_at_a_time(tiny, tiny_sae):
    items = ITEMS + [{"question": "Which one is the longest word here?", "options": ["x", "yy", "zzz"], "answer": "C"}]
    edit = Pick(tiny_sae, 5, 1.0, 300.0).edit()
    together = answers(tiny, items, [edit], batch_size=2)
    alone = [int(answers(tiny, [it], [edit])[0]) for it in items]
    assert together.tolist() == alone


def test_variants_a_and_p_over_two_layers(tiny, tiny_sae):
    # variant A: one pick per layer's SAE, all edits at once; variant P: a layer's pick kept only if it alone
    # beats the baseline accuracy on validation items
    from toolkit.config import SAEConfig
    from toolkit.sae.sae import SAE

    sae0 = SAE.from_config(SAEConfig(d_in=64, d_sae=48, architecture="relu", site="blocks.0.resid_post"), seed=1)
    y = np.r_[np.ones(2), np.zeros(1)]
    picks = [select(last_codes(tiny, s, ITEMS) + 1e-3 * torch.arange(48), y, s) for s in (sae0, tiny_sae)]
    assert [p.sae.cfg.site for p in picks] == ["blocks.0.resid_post", tiny_sae.cfg.site]
    edits = [p.edit() for p in picks]
    assert {e.site for e in edits} == {"blocks.0.resid_post", tiny_sae.cfg.site}
    together = answers(tiny, ITEMS, edits)
    assert together.shape == (3,)
    alone = [float(answers(tiny, ITEMS, [e]).mean()) for e in edits]
    assert prune(tiny, picks, ITEMS, baseline=-1.0) == picks  # any accuracy beats -1
    assert prune(tiny, picks, ITEMS, baseline=1.0) == []  # no accuracy beats 1
    kept = prune(tiny, picks, ITEMS, baseline=0.5)
    assert kept == [p for p, a in zip(picks, alone, strict=True) if a > 0.5]
