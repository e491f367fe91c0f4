import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from toolkit.analysis.axbench import (
    CONCEPT_NAMES,
    METHODS,
    AxBenchResult,
    best_factors,
    detect_concept,
    how_made,
    judge_validation,
    load_concepts,
    steer_concept,
)
from toolkit.analysis.axbench.detect import column_auroc, max_codes, text_token_acts
from toolkit.analysis.axbench.steer import _spec, prompted
from toolkit.analysis.judge import STOPWORDS
from toolkit.analysis.table import Table
from toolkit.config import SAEConfig
from toolkit.errors import EmptyInputError
from toolkit.sae.sae import SAE
from toolkit.tracing import generate

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def sae():
    return SAE.from_config(SAEConfig(d_in=64, d_sae=48, architecture="topk", k=8, site=SITE), seed=0)


@pytest.fixture(scope="module")
def concepts():
    return load_concepts()


@pytest.fixture(scope="module")
def det(tiny, sae, concepts):
    return detect_concept(tiny, sae, concepts[0])


def test_packaged_concepts_meet_the_spec(concepts):
    assert [c.name for c in concepts] == list(CONCEPT_NAMES) and "by hand" in how_made()
    for c in concepts:
        assert len(c.train_positive) >= 24 and len(c.train_negative) >= 24 and len(c.instructions) >= 6
        assert len(c.eval_hard_negative) >= 6 and len(c.eval_positive) >= 12
        held = set(c.eval_texts) | set(c.judge_positive)
        assert not held & set(c.train_positive + c.train_negative), "held-out texts must not be training texts"
        assert not set(c.judge_positive) & set(c.eval_texts)
        assert sum(c.eval_labels) == len(c.eval_positive)
        for other in concepts:  # the judge's negatives include the other concepts' judge texts
            if other.name != c.name:
                assert set(other.judge_positive) <= set(c.judge_negative)
    with pytest.raises(ValueError, match="unknown concept"):
        load_concepts(["weather"])
    with pytest.raises(ValueError, match="at least 24"):
        dataclasses.replace(concepts[0], train_positive=concepts[0].train_positive[:5])
    with pytest.raises(ValueError, match="instructions"):
        dataclasses.replace(concepts[0], instructions=concepts[0].instructions[:3])
    with pytest.raises(EmptyInputError, match="eval_hard_negative"):
        dataclasses.replace(concepts[0], eval_hard_negative=())


def test_column_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 5)).round(1)  # ties included
    labels = rng.integers(0, 2, 30)
    want = [roc_auc_score(labels, scores[:, j]) for j in range(5)]
    np.testing.assert_allclose(column_auroc(scores, labels), want)


def test_detection_follows_its_definitions(tiny, sae, concepts, det):
    c = concepts[0]
    pos = text_token_acts(tiny, SITE, c.train_positive)
    neg = text_token_acts(tiny, SITE, c.train_negative)
    diff = torch.cat(pos).mean(0) - torch.cat(neg).mean(0)
    assert torch.allclose(det.directions["DiffMean"], diff / diff.norm(), atol=1e-5)
    held = text_token_acts(tiny, SITE, c.eval_texts)
    want = [float((a @ det.directions["DiffMean"]).max()) for a in held]  # max over tokens of the projection
    np.testing.assert_allclose(det.scores["DiffMean"], want, rtol=1e-5)
    train_auroc = column_auroc(max_codes(sae, pos + neg).numpy(), np.r_[np.ones(len(pos)), np.zeros(len(neg))])
    assert det.latent == int(np.argmax(train_auroc))  # chosen on training texts only
    np.testing.assert_allclose(det.scores["SAE"], max_codes(sae, held)[:, det.latent].numpy(), rtol=1e-6)
    for m in METHODS:
        assert det.auroc[m] == pytest.approx(roc_auc_score(det.labels, det.scores[m]))
        assert 0.0 <= det.auroc_hard[m] <= 1.0
    assert det.directions["Probe"].shape == (64,) and det.directions["Probe"].norm() == pytest.approx(1.0)
    assert det.max_act["SAE"] == pytest.approx(float(det.scores["SAE"].max()))
    assert det.hard.sum() == len(c.eval_hard_negative) and not det.labels[det.hard].any()
    tokens = torch.cat(pos + neg)
    assert det.site_norm == pytest.approx(float(tokens.norm(dim=1).median()), rel=1e-6)


def test_every_method_pushes_with_the_same_norm_per_factor(sae, det):
    # one factor = one edit norm (factor x the site's median token norm), whatever the method
    for method in ("DiffMean", "Probe", "SAE"):
        item = _spec(method, det, sae, SITE).with_strength(0.3).items[0]
        edit = item.value * item.direction() if method == "SAE" else item.strength * item.unit * item.direction()
        assert float(edit.norm()) == pytest.approx(0.3 * det.site_norm, rel=1e-4), method
    with pytest.raises(ValueError, match="site norm"):
        _spec("DiffMean", dataclasses.replace(det, site_norm=float("nan")), sae, SITE)


def test_the_concept_judge_reads_the_description_and_validates_on_held_out_texts(concepts):
    for c in concepts:
        lex = c.judge_lexicon
        assert c.lexicon[0] in lex and not set(lex) & STOPWORDS
    table = judge_validation(concepts)
    assert table["concept"] == [c.name for c in concepts]
    for r in table:  # texts the judge never saw: positives score well above generic negatives
        assert r["positive"] > 1.0 > 0.5 > r["negative"], r


def test_steering_rows_and_best_factor(tiny, sae, concepts, det):
    c = dataclasses.replace(concepts[0], instructions=concepts[0].instructions[:6])
    unsteered = generate(tiny, list(c.instructions), max_new_tokens=3)
    table = steer_concept(tiny, sae, c, det, unsteered=unsteered, factors=[0.5, 2.0], max_new_tokens=3)
    methods = table["method"]
    assert methods.count("none") == methods.count("Prompt") == 6
    assert all(methods.count(m) == 12 for m in ("DiffMean", "Probe", "SAE"))
    assert table["split"].count("A") == table["split"].count("B")
    for r in table:
        three = (r["concept_score"], r["instruction_score"], r["fluency_score"])
        assert all(v in (0.0, 1.0, 2.0) for v in three) and r["concept"] == c.name
        assert r["overall"] == 0.0 or min(three) > 0
    best = best_factors(table)
    assert set(best["method"]) == {"none", "Prompt", "DiffMean", "Probe", "SAE"}
    with pytest.raises(ValueError, match="unsteered"):
        steer_concept(tiny, sae, c, det, unsteered=unsteered[:2])


def test_best_factor_is_chosen_on_split_a_and_reported_on_b():
    rows = [{"concept": "x", "method": "DiffMean", "factor": f, "split": split, "overall": v, "concept_score": 1.0,
             "instruction_score": 2.0, "fluency_score": 2.0}
            for f, a, b in ((0.5, 1.0, 0.2), (1.0, 1.5, 0.4), (2.0, 0.1, 1.9)) for split, v in (("A", a), ("B", b))]
    best = best_factors(Table(rows))
    assert best[0]["factor"] == 1.0 and best[0]["overall"] == pytest.approx(0.4)  # not 2.0, the best on B
    assert best[0]["overall_A"] == pytest.approx(1.5)


def test_prompted_instruction(concepts):
    c = concepts[1]
    p = prompted("Question: How do I sleep?\nAnswer:", c)
    assert p.startswith("Question: How do I sleep? Answer in a way that talks about cooking") and p.endswith("\nAnswer:")
    assert prompted("Tell me a story.", c).endswith(c.description + ".")


def test_result_summary_and_ordering(det):
    best = Table([{"concept": det.concept, "method": m, "factor": 1.0, "overall_A": 1.0, "concept_score": 1.0,
                   "overall": v, "instruction_score": 2.0, "fluency_score": 2.0}
                  for m, v in (("Prompt", 1.5), ("DiffMean", 0.8), ("Probe", 0.3), ("SAE", 0.5), ("none", 0.0))])
    res = AxBenchResult([det], None, best)
    s = {r["method"]: r for r in res.summary}
    assert s["DiffMean"]["auroc"] == pytest.approx(det.auroc["DiffMean"]) and s["Prompt"]["overall"] == 1.5
    order = res.ordering()
    assert order["steering Prompt > DiffMean"] and order["steering DiffMean > SAE"]
    assert order["detection DiffMean > SAE"] == (det.auroc["DiffMean"] > det.auroc["SAE"])
    assert "steering Prompt > DiffMean" not in AxBenchResult([det], None, None).ordering()
