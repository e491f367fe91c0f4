"""Reliability case 4 as a class: every analysis function that consumes activations or codes raises
NonFiniteError naming the site (or source) and the count, instead of returning empty or NaN results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.analysis.attribution import attribute
from toolkit.analysis.axbench.detect import text_token_acts
from toolkit.analysis.diff import diff_table, latent_activations, latent_scaling
from toolkit.analysis.diff_view import model_contributions
from toolkit.analysis.feature_store import token_latents
from toolkit.analysis.features import feature_density, top_contexts, top_features
from toolkit.analysis.judge import continuation_nll
from toolkit.analysis.probes import pooled_features, train_probe
from toolkit.analysis.steering.vectors import caa, diffmean, latent_unit, projection_scores, site_unit
from toolkit.config import CrosscoderConfig, SAEConfig
from toolkit.crosscoder import Crosscoder, PairedActivations, evaluate_crosscoder
from toolkit.errors import NonFiniteError, check_finite
from toolkit.models import tiny_gemma2
from toolkit.sae.metrics import evaluate_sae, reconstruction_metrics
from toolkit.sae.sae import SAE

pytestmark = pytest.mark.usefixtures("one_thread")
SITE = "blocks.1.resid_post"
SITE_RE = r"non-finite \(\d+ NaN, \d+ inf\) in .*blocks\.1\.resid_post"


@pytest.fixture(scope="module")
def nan_model():
    """A tiny Gemma-2 whose layer-0 MLP writes NaN into one channel: every activation after it is NaN."""
    m = tiny_gemma2(seed=0)
    with torch.no_grad():
        m.hf.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return m


@pytest.fixture(scope="module")
def sae():
    return SAE.from_config(SAEConfig(d_in=64, d_sae=32, architecture="relu", site=SITE), seed=0)


@pytest.fixture(scope="module")
def contexts(nan_model):
    ids = nan_model.tokenize(["The cat sat on the mat.", "Water boils at one hundred degrees."])["input_ids"]
    return ids[:, :6].cpu()


def _paired(bad: bool = True) -> PairedActivations:
    x = torch.randn(20, 2, 8)
    if bad:
        x[3, 1, 2] = float("nan")
        x[5, 0, 0] = float("inf")
    return PairedActivations(x, ("base", "ft"), "blocks.0.resid_post")


def _cc() -> Crosscoder:
    return Crosscoder(CrosscoderConfig(d_in=8, d_sae=6, architecture="relu", models=("base", "ft"),
                                       site="blocks.0.resid_post"), seed=0)


def test_check_finite_is_one_helper_and_counts():
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    with pytest.raises(NonFiniteError, match=r"3 of 4 values are non-finite \(1 NaN, 2 inf\) in what"):
        check_finite(x, "what")
    with pytest.raises(NonFiniteError, match="in arr"):
        check_finite(np.array([np.nan]), "arr")
    ok = torch.ones(3)
    assert check_finite(ok, "x") is ok and check_finite(torch.arange(3), "ids") is not None
    check_finite(torch.full((10,), 3e38), "x")  # finite values whose sum overflows: the exact test decides
    check_finite(torch.full((10,), 6e4, dtype=torch.float16), "x")
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        with pytest.raises(NonFiniteError, match=r"1 of 4 .* \(0 NaN, 1 inf\)"):
            check_finite(torch.tensor([1.0, 2.0, float("inf"), 3.0], dtype=dtype), "x")


ANALYSES = {
    "top_features": lambda m, s, c: top_features(s, m, "The cat sat"),
    "top_contexts": lambda m, s, c: top_contexts(s, m, c, [0, 1], progress=False),
    "feature_density": lambda m, s, c: feature_density(s, m, c, progress=False),
    "token_latents": lambda m, s, c: token_latents(m, s, "The cat sat"),
    "evaluate_sae": lambda m, s, c: evaluate_sae(s, m, c, progress=False),
    "pooled_features": lambda m, s, c: pooled_features(m, ["The cat", "The dog"], SITE),
    "diffmean": lambda m, s, c: diffmean(m, SITE, ["The cat"], ["The dog"]),
    "caa": lambda m, s, c: caa(m, SITE, [("The cat", "The dog")]),
    "site_unit": lambda m, s, c: site_unit(m, SITE, ["The cat sat"]),
    "latent_unit": lambda m, s, c: latent_unit(m, s, 0, ["The cat sat"]),
    "projection_scores": lambda m, s, c: projection_scores(m, SITE, torch.ones(64), ["The cat sat"]),
    "attribute": lambda m, s, c: attribute(m, "The cat sat", lambda logits: logits[-1, 5], sites=SITE),
    "text_token_acts": lambda m, s, c: text_token_acts(m, SITE, ["The cat sat"]),
}


@pytest.mark.parametrize("name", list(ANALYSES))
def test_analysis_of_nan_activations_raises_naming_the_site(nan_model, sae, contexts, name):
    with pytest.raises(NonFiniteError, match=SITE_RE):
        ANALYSES[name](nan_model, sae, contexts)


def test_judge_refuses_nan_logits(nan_model):
    with pytest.raises(NonFiniteError, match="logits"):
        continuation_nll(nan_model, ["The cat"], [" sat on the mat"])


def test_reconstruction_metrics_and_probes_on_given_tensors(sae):
    x = torch.randn(10, 64)
    x[2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"1 of 640 values .* activations \(rows 0\.\.9\)"):
        reconstruction_metrics(sae, x)
    with pytest.raises(NonFiniteError, match="probe's features"):
        train_probe(x.numpy(), np.arange(10) % 2)


CROSSCODER = {
    "evaluate_crosscoder": lambda cc, p: evaluate_crosscoder(cc, p),
    "latent_scaling": lambda cc, p: latent_scaling(cc, p),
    "diff_table": lambda cc, p: diff_table(cc, p),
    "latent_activations": lambda cc, p: latent_activations(cc, p, 0),
    "model_contributions": lambda cc, p: model_contributions(cc, p.acts, 0),
}


@pytest.mark.parametrize("name", list(CROSSCODER))
def test_crosscoder_analysis_of_nan_activations_raises_naming_the_source(name):
    with pytest.raises(NonFiniteError, match=r"2 of 320 values are non-finite \(1 NaN, 1 inf\) in paired activations"):
        CROSSCODER[name](_cc(), _paired())
    CROSSCODER[name](_cc(), _paired(bad=False))  # finite data passes
