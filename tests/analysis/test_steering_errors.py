"""Bad steering input fails with a clear error before any forward pass."""

import importlib
import math

import pytest
import torch

from toolkit.analysis.steering import (
    LatentSteer,
    SteeringSpec,
    VectorSteer,
    caa,
    diffmean,
    latent_unit,
    pca_direction,
    sweep,
)
from toolkit.config import SAEConfig
from toolkit.errors import EmptyInputError, FeatureIndexError, NonFiniteError, ShapeMismatchError
from toolkit.sae import SAE

SITE = "blocks.0.resid_post"


@pytest.fixture(scope="module")
def sae():
    return SAE.from_config(SAEConfig(d_in=64, d_sae=128, architecture="topk", k=8, site=SITE), seed=0)


@pytest.fixture
def no_forward(tiny, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model ran")
    monkeypatch.setattr(tiny.hf, "forward", boom)
    monkeypatch.setattr(importlib.import_module("toolkit.analysis.steering.sweep"), "generate_hooked", boom)
    monkeypatch.setattr(importlib.import_module("toolkit.analysis.steering.vectors"), "capture", boom)
    return tiny


@pytest.mark.parametrize("bad", [-1, 128, 1.5, "3", True])
def test_latent_out_of_range(sae, bad):
    with pytest.raises(FeatureIndexError, match="0..127"):
        LatentSteer(sae, bad)


def test_vector_wrong_width_or_nan(no_forward):
    spec = SteeringSpec([VectorSteer(torch.ones(32), SITE, name="short")])
    with pytest.raises(ShapeMismatchError, match="short has width 32 but site blocks.0.resid_post .* has width 64"):
        spec.generate(no_forward, ["The cat"])
    with pytest.raises(ShapeMismatchError):
        sweep(no_forward, ["The cat"], spec, [1.0])
    with pytest.raises(NonFiniteError, match="1 NaN/inf"):
        VectorSteer(torch.tensor([1.0, float("nan")] + [0.0] * 62), SITE)
    with pytest.raises(ValueError, match="all zeros"):
        VectorSteer(torch.zeros(64), SITE)
    with pytest.raises(TypeError, match="1-D"):
        VectorSteer(torch.ones(2, 64), SITE)


def test_site_the_sae_was_not_trained_on(no_forward, sae):
    with pytest.raises(ValueError, match="trained on blocks.0.resid_post, not blocks.1.resid_post"):
        LatentSteer(sae, 3, site="blocks.1.resid_post")
    wide = SAE.from_config(SAEConfig(d_in=128, d_sae=32, architecture="topk", k=4, site="blocks.0.mlp_out"))
    with pytest.raises(ShapeMismatchError, match="reads 128-wide activations"):
        SteeringSpec([LatentSteer(wide, 0)]).run(no_forward, "The cat")
    anon = SAE.from_config(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4))
    with pytest.raises(ValueError, match="does not know its site"):
        LatentSteer(anon, 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_strengths(no_forward, sae, bad):
    with pytest.raises(NonFiniteError, match="finite"):
        LatentSteer(sae, 1, "add", bad)
    with pytest.raises(NonFiniteError):
        VectorSteer(torch.ones(64), SITE, "add", 1.0, unit=bad)
    spec = SteeringSpec([LatentSteer(sae, 1)])
    with pytest.raises(NonFiniteError):
        spec.with_strength(bad)
    with pytest.raises(NonFiniteError):
        sweep(no_forward, ["The cat"], spec, [0.0, bad])


def test_bad_choices_and_sweep_inputs(no_forward, sae):
    with pytest.raises(ValueError, match="latent method must be one of add, clamp, scale, ablate"):
        LatentSteer(sae, 1, "boost")
    with pytest.raises(ValueError, match="vector method must be one of add, project_out, cap"):
        VectorSteer(torch.ones(64), SITE, "clamp")
    with pytest.raises(ValueError, match="positions must be one of all, prompt, generated"):
        LatentSteer(sae, 1, positions="last")
    with pytest.raises(ValueError, match="unit must be a positive"):
        LatentSteer(sae, 1, unit=0.0)
    with pytest.raises(ValueError, match="unique"):
        SteeringSpec([LatentSteer(sae, 1), LatentSteer(sae, 1)])
    with pytest.raises(TypeError, match="LatentSteer or VectorSteer"):
        SteeringSpec(["x"])
    spec = SteeringSpec([LatentSteer(sae, 1)])
    with pytest.raises(EmptyInputError, match="strengths"):
        sweep(no_forward, ["The cat"], spec, [])
    with pytest.raises(EmptyInputError, match="prompts is empty"):
        sweep(no_forward, [], spec, [1.0])
    with pytest.raises(TypeError, match="callable"):
        sweep(no_forward, ["The cat"], spec, [1.0], scores={"x": 3})


def test_empty_or_one_sided_prompt_sets(no_forward, sae):
    with pytest.raises(EmptyInputError, match="0 positive and 2 negative"):
        diffmean(no_forward, SITE, [], ["a b", "c d"])
    with pytest.raises(EmptyInputError, match="2 positive and 0 negative"):
        diffmean(no_forward, SITE, ["a b", "c d"], [])
    with pytest.raises(EmptyInputError, match="empty or non-string"):
        diffmean(no_forward, SITE, ["a b", "  "], ["c"])
    with pytest.raises(EmptyInputError, match="pairs are empty"):
        caa(no_forward, SITE, [])
    with pytest.raises(TypeError, match="positive, negative"):
        pca_direction(no_forward, SITE, [("a", "b", "c")])
    with pytest.raises(EmptyInputError):
        latent_unit(no_forward, sae, 3, [])
    with pytest.raises(FeatureIndexError):
        latent_unit(no_forward, sae, 999, ["a b"])
