"""An SAE or crosscoder used with a model or site other than the one its config records: width -> error,
site -> SiteMismatchError unless overridden explicitly (`sae.at_site`, `allow_other_site`), model name -> warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from toolkit.analysis.feature_store import build_feature_store, token_latents
from toolkit.analysis.features import feature_density, top_contexts, top_features
from toolkit.analysis.probes import pooled_features
from toolkit.analysis.steering.items import LatentSteer
from toolkit.analysis.steering.vectors import latent_unit
from toolkit.config import CrosscoderConfig, SAEConfig
from toolkit.crosscoder import Crosscoder, PairedActivations, evaluate_crosscoder
from toolkit.errors import ModelMismatchWarning, ShapeMismatchError, SiteMismatchError
from toolkit.sae.metrics import evaluate_sae
from toolkit.sae.sae import SAE, same_model_name
from toolkit.sae.splice import run_with_sae, sae_splice

pytestmark = pytest.mark.usefixtures("one_thread")
TRAINED, OTHER = "blocks.1.resid_post", "blocks.0.resid_post"


def _sae(model: str | None = None) -> SAE:
    return SAE.from_config(SAEConfig(d_in=64, d_sae=32, architecture="relu", site=TRAINED, model=model), seed=0)


def _ids(tiny):
    return tiny.tokenize(["The cat sat on the mat.", "Water boils at one hundred."])["input_ids"][:, :6].cpu()


USERS = {
    "top_features": lambda m, s, site: top_features(s, m, "The cat sat", site=site),
    "top_contexts": lambda m, s, site: top_contexts(s, m, _ids(m), 0, site=site, progress=False),
    "feature_density": lambda m, s, site: feature_density(s, m, _ids(m), site=site, progress=False),
    "token_latents": lambda m, s, site: token_latents(m, s, "The cat sat", site=site),
    "build_feature_store": lambda m, s, site: build_feature_store(m, s, _ids(m), "/nonexistent/x", site=site),
    "sae_splice": lambda m, s, site: sae_splice(s, m, site),
    "run_with_sae": lambda m, s, site: run_with_sae(m, "The cat", s, site),
    "evaluate_sae": lambda m, s, site: evaluate_sae(s, m, _ids(m), site, progress=False),
    "latent_unit": lambda m, s, site: latent_unit(m, s, 0, ["The cat"], site=site),
    "pooled_features": lambda m, s, site: pooled_features(m, ["The cat"], site, sae=s),
    "LatentSteer": lambda m, s, site: LatentSteer(s, 0, site=site),
}


@pytest.mark.parametrize("name", list(USERS))
def test_another_site_is_an_error_naming_the_override(tiny, name):
    with pytest.raises(SiteMismatchError, match=rf"trained on {TRAINED}, not {OTHER}.* sae\.at_site\('{OTHER}'\)"):
        USERS[name](tiny, _sae(), OTHER)


def test_at_site_is_the_explicit_override_and_shares_parameters(tiny):
    sae = _sae()
    moved = sae.at_site(OTHER)
    assert moved.cfg.site == OTHER and moved.W_enc.data_ptr() == sae.W_enc.data_ptr()
    got = top_features(moved, tiny, "The cat sat")
    assert got == top_features(moved, tiny, "The cat sat", site=OTHER)
    assert sae.check_compatible(tiny, OTHER, allow_other_site=True).name == OTHER
    with pytest.raises(ShapeMismatchError, match="reads 64-wide activations, but site blocks.0.mlp_post"):
        sae.check_compatible(tiny, "blocks.0.mlp_post", allow_other_site=True)  # width is never overridden


def test_another_model_name_warns_and_the_same_one_does_not(tiny):
    with pytest.warns(ModelMismatchWarning, match=r"trained on model 'google/gemma-2-2b' but is used with "
                                                  r"'tiny-gemma2-seed0'"):
        top_features(_sae("google/gemma-2-2b"), tiny, "The cat")
    with pytest.warns(ModelMismatchWarning):
        sae_splice(_sae("google/gemma-2-2b"), tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        top_features(_sae(tiny.name), tiny, "The cat")
        top_features(_sae(None), tiny, "The cat")
    assert same_model_name("google/gemma-2-2b", "/models/gemma-2-2b/") and not same_model_name("a/b", "a/c")


def test_crosscoder_from_another_site_is_a_site_mismatch():
    cc = Crosscoder(CrosscoderConfig(d_in=8, d_sae=6, architecture="relu", models=("b", "f"), site=TRAINED), seed=0)
    acts = PairedActivations(torch.randn(4, 2, 8), ("b", "f"), OTHER)
    with pytest.raises(SiteMismatchError, match=f"site {TRAINED}.*got activations from site {OTHER}"):
        evaluate_crosscoder(cc, acts)
    with pytest.raises(ValueError, match="got activations of models"):
        evaluate_crosscoder(cc, PairedActivations(torch.randn(4, 2, 8), ("x", "y"), TRAINED))
