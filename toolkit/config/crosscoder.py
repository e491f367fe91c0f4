"""CrosscoderConfig: the shape and provenance of a crosscoder."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.config._checks import (
    DictConfig,
    normalize_site,
    positive_int,
)
from toolkit.config.optimization import Optimization
from toolkit.config.sae import SAE_DTYPES

CROSSCODER_ARCHITECTURES = ("batchtopk", "relu")
"""Crosscoder sparsity: 'batchtopk' (top k * n_tokens codes over a batch, a threshold at inference; the fix of
"Overcoming Sparsity Artifacts in Crosscoders") or 'relu' (ReLU + decoder-norm-weighted L1, Anthropic's original)."""


@dataclass(frozen=True)
class CrosscoderConfig(DictConfig):
    """Shape and provenance of a crosscoder over two models' activations at one site (stored as its cfg.json)."""

    TUPLES = ("models",)

    d_in: int
    """Width of each model's activations at the site (both models must share it)."""

    d_sae: int
    """Number of latents shared by the two models."""

    architecture: str = "batchtopk"
    """'batchtopk' or 'relu' (see CROSSCODER_ARCHITECTURES)."""

    k: int | None = None
    """'batchtopk' only: mean active latents per token (k * n_tokens over a training batch)."""

    models: tuple[str, str] | None = None
    """Names of the two models, (base, fine-tuned), as Model.name gives them; activations tagged with another
    pair are refused. None: unknown (e.g. a checkpoint loaded from another library), nothing is checked."""

    site: str | None = None
    """Site both activations come from, e.g. 'blocks.11.resid_post', stored in canonical form; None: unknown."""

    dtype: str = "float32"
    """Parameter dtype name: 'float32', 'bfloat16', 'float16' or 'float64'."""

    def __post_init__(self) -> None:
        positive_int("d_in", self.d_in)
        positive_int("d_sae", self.d_sae)
        if self.architecture not in CROSSCODER_ARCHITECTURES:
            raise ValueError(f"unknown crosscoder architecture {self.architecture!r}; "
                             f"valid: {', '.join(CROSSCODER_ARCHITECTURES)}")
        if self.architecture == "batchtopk":
            if self.k is None:
                raise ValueError("architecture 'batchtopk' needs k (mean active latents per token)")
            positive_int("k", self.k)
            if self.k > self.d_sae:
                raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}")
        elif self.k is not None:
            raise ValueError(f"k is only used by 'batchtopk'; {self.architecture!r} takes k=None")
        if self.models is not None:
            models = tuple(self.models)
            if len(models) != 2 or not all(isinstance(m, str) and m for m in models):
                raise ValueError(f"models must be two non-empty names (base, fine-tuned), got {self.models!r}")
            object.__setattr__(self, "models", models)
        if self.dtype not in SAE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(SAE_DTYPES)}; got {self.dtype!r}")
        normalize_site(self)




@dataclass(frozen=True, kw_only=True)
class CrosscoderTraining(Optimization):
    """How to train a crosscoder: the shared Optimization settings, with defaults for crosscoders (stored in
    checkpoints; resuming requires equal settings)."""

    lr: float = 1e-3
    batch_size: int = 512
    total_steps: int | None = 1000
    l1_coefficient: float = 1.0
    dead_after_tokens: int = 50 * 512
    """A latent is dead when it has not fired in this many training tokens (AuxK then revives it)."""
