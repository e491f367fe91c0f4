"""Steering: one composable spec of SAE-latent and vector items at any sites, for traces, generation and sweeps.

    spec = SteeringSpec([LatentSteer(sae, 123, "clamp", 1.0, unit=latent_unit(model, sae, 123, texts)),
                         VectorSteer(diffmean(model, site, pos, neg), site, "add", 0.5, unit=site_unit(model, site, texts))])
    spec.generate(model, prompts)          # steered continuations
    sweep(model, prompts, spec, [0, 0.5, 1], scores={"concept": fn})   # a tidy table
"""

from toolkit.analysis.steering.items import (
    LATENT_METHODS,
    POSITIONS,
    VECTOR_METHODS,
    LatentSteer,
    VectorSteer,
)
from toolkit.analysis.steering.spec import SteeringSpec
from toolkit.analysis.steering.sweep import sweep
from toolkit.analysis.steering.vectors import (
    caa,
    diffmean,
    last_token_activations,
    latent_unit,
    pair_differences,
    pca_direction,
    probe_direction,
    projection_scores,
    site_unit,
    token_activations,
)

__all__ = [
    "LATENT_METHODS", "POSITIONS", "VECTOR_METHODS", "LatentSteer", "SteeringSpec", "VectorSteer", "caa", "diffmean",
    "last_token_activations", "latent_unit", "pair_differences", "pca_direction", "probe_direction",
    "projection_scores", "site_unit", "sweep", "token_activations",
]
