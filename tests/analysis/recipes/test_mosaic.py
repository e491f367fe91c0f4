import numpy as np
import pytest

from toolkit.analysis.recipes import load_data
from toolkit.analysis.recipes.mosaic import (
    SAE_POOLINGS,
    macro_f1,
    mosaic_data,
    mosaic_table,
    sae_text_features,
    tfidf_macro_f1,
)
from toolkit.errors import ArgumentError, EmptyInputError, NonFiniteError, ShapeMismatchError

A = [f"the cat {w} on the mat" for w in ("sat", "slept", "ran", "purred", "stood", "lay")]
B = [f"a dog {w} in the park today" for w in ("sat", "slept", "ran", "barked", "stood", "lay")]


def test_sae_features_shapes_and_pooling_semantics(tiny, tiny_sae):
    f = sae_text_features(tiny, tiny_sae, A[:3], top_n=5)
    assert set(f) == set(SAE_POOLINGS)
    for X in f.values():
        assert X.shape == (3, 48) and np.isfinite(X).all()
    n_tokens = [len(tiny.tokenizer(t)["input_ids"]) - 1 for t in A[:3]]  # minus BOS
    # each token contributes at most top_n ones; binary is count > 0; max >= mean >= 0 for ReLU codes
    assert (f["topn_count"].sum(1) <= 5 * np.array(n_tokens)).all()
    assert np.array_equal(f["topn_binary"], (f["topn_count"] > 0).astype(np.float32))
    assert (f["max"] >= f["mean"] - 1e-6).all()


def test_macro_f1_separates_planted_classes_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    X = rng.normal(size=(60, 8))
    assert macro_f1(X, y) < 0.6  # chance is 1/3
    X[:, 0] += 4 * y
    assert macro_f1(X, y) > 0.9


def test_table_on_tiny_model(tiny, tiny_sae):
    t = mosaic_table(tiny, tiny_sae, A + B, [0] * 6 + [1] * 6, hidden_sites=["blocks.0.resid_post"], folds=3)
    assert [r["features"] for r in t] == [f"SAE {p}" for p in SAE_POOLINGS] + ["hidden mean", "TF-IDF"]
    assert all(0.0 <= r["macro_f1"] <= 1.0 for r in t)
    assert t.where(features="TF-IDF")["macro_f1"][0] > 0.9  # "cat"/"dog" split the classes by word


def test_bad_input(tiny, tiny_sae):
    with pytest.raises(EmptyInputError):
        sae_text_features(tiny, tiny_sae, [])
    with pytest.raises(ArgumentError, match="top_n"):
        sae_text_features(tiny, tiny_sae, A, top_n=49)
    with pytest.raises(ArgumentError, match="two classes"):
        macro_f1(np.ones((6, 3)), [1] * 6)
    with pytest.raises(ArgumentError, match="at least 2"):
        macro_f1(np.ones((6, 3)), [0] * 5 + [1])
    with pytest.raises(ShapeMismatchError):
        macro_f1(np.ones((6, 3)), [0, 1, 0, 1])
    with pytest.raises(EmptyInputError):
        macro_f1(np.ones((0, 3)), [])
    X = np.ones((6, 3))
    X[2, 1] = np.nan
    with pytest.raises(NonFiniteError):
        macro_f1(X, [0, 1] * 3)
    with pytest.raises(ArgumentError, match="two classes"):
        tfidf_macro_f1(A, [0] * 6)
    with pytest.raises(ArgumentError, match="Cs"):
        macro_f1(np.arange(18.0).reshape(6, 3), [0, 1] * 3, Cs=[0.0])
    with pytest.raises(ArgumentError, match="constant"):
        macro_f1(np.ones((6, 3)), [0, 1] * 3)


def test_written_data_set():
    texts, labels = mosaic_data()
    assert len(texts) == len(labels) >= 180 and len(set(texts)) == len(texts)
    assert sorted(set(labels)) == ["complaint", "praise", "question"]
    assert "by hand" in load_data("mosaic")["how_made"]
    with pytest.raises(ArgumentError, match="no recipe data set"):
        load_data("nope")
