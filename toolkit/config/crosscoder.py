"""CrosscoderConfig: the shape and provenance of a crosscoder."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from toolkit.config._checks import normalize_site, positive_int, reject_unknown_keys
from toolkit.config.sae import SAE_DTYPES

CROSSCODER_ARCHITECTURES = ("batchtopk", "relu")
"""Crosscoder sparsity: 'batchtopk' (top k * n_tokens codes over a batch, a threshold at inference; the fix of
"Overcoming Sparsity Artifacts in Crosscoders") or 'relu' (ReLU + decoder-norm-weighted L1, Anthropic's original)."""


@dataclass(frozen=True)
class CrosscoderConfig:
    """Shape and provenance of a crosscoder over two models' activations at one site (stored as its cfg.json)."""

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrosscoderConfig:
        """Build from a dict such as cfg.json; unknown keys raise ValueError listing the valid ones."""
        reject_unknown_keys(cls, d)
        d = dict(d)
        if isinstance(d.get("models"), list):
            d["models"] = tuple(d["models"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; `CrosscoderConfig.from_dict(cfg.to_dict()) == cfg`."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["models"] is not None:
            d["models"] = list(d["models"])
        return d
