"""SAEConfig: the shape and semantics of a sparse autoencoder."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from toolkit.config._checks import (
    DictConfig,
    normalize_site,
    positive_int,
    reject_unknown_keys,
    with_tuples,
)

SAE_DTYPES = ("float32", "bfloat16", "float16", "float64")

SAE_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "jumprelu": (),
    "relu": (),
    "topk": ("k",),
    "batchtopk": ("k",),
    "matryoshka": ("k", "matryoshka_groups"),
    "hierarchical_topk": ("k",),
    "adaptivek": ("k", "k_min"),
}
"""SAE architecture names and the optional SAEConfig fields each one requires (the others must stay None).
toolkit.sae.architectures holds their behaviour and adds the names of architectures registered later."""


@dataclass(frozen=True)
class SAEConfig(DictConfig):
    """Shape and semantics of a sparse autoencoder: everything needed to rebuild it from a weights file."""

    TUPLES = ("matryoshka_groups",)

    d_in: int
    """Width of the activations the SAE reads (its site's width, e.g. 2304 on Gemma-2-2B's residual stream)."""

    d_sae: int
    """Number of latents (features)."""

    architecture: str
    """How pre-activations become codes: 'jumprelu', 'relu', 'topk', 'batchtopk', 'matryoshka',
    'hierarchical_topk' or 'adaptivek' (see SAE_ARCHITECTURES and toolkit.sae.architectures)."""

    k: int | None = None
    """Active latents per token. Required by 'topk' (exactly k per token), 'batchtopk' and 'matryoshka'
    (k * n_tokens over a training batch; also their inference fallback before the threshold is estimated),
    'hierarchical_topk' (the largest budget K; any k <= K works at inference) and 'adaptivek' (k_max)."""

    matryoshka_groups: tuple[int, ...] | None = None
    """'matryoshka' only: nested prefix widths, strictly increasing and ending at d_sae, e.g. (128, 512, 2048).
    The first w latents alone form a smaller SAE for each w listed."""

    k_min: int | None = None
    """'adaptivek' only: the smallest k a token gets (its least complex inputs); 1 <= k_min <= k."""

    dtype: str = "float32"
    """Parameter dtype name: 'float32', 'bfloat16', 'float16' or 'float64'."""

    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens, sparsify, dictionary_learning: True; Gemma Scope: False)."""

    model: str | None = None
    """Name of the model whose activations the SAE was trained on, e.g. 'google/gemma-2-2b' (informational)."""

    site: str | None = None
    """Site the SAE reads, e.g. 'blocks.6.resid_post'; stored in canonical form."""

    def __post_init__(self) -> None:
        positive_int("d_in", self.d_in)
        positive_int("d_sae", self.d_sae)
        if not isinstance(self.architecture, str) or self.architecture not in SAE_ARCHITECTURES:
            raise ValueError(
                f"unknown SAE architecture {self.architecture!r}; valid: {', '.join(SAE_ARCHITECTURES)}"
            )
        required = SAE_ARCHITECTURES[self.architecture]
        if "k" in required:
            if self.k is None:
                raise ValueError(f"architecture {self.architecture!r} needs k (active latents per token)")
            positive_int("k", self.k)
            if self.k > self.d_sae:
                raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}")
        elif self.k is not None:
            raise ValueError(f"k is only used by top-k architectures; {self.architecture!r} takes k=None")
        if "k_min" in required:
            if self.k_min is None:
                raise ValueError(f"architecture {self.architecture!r} needs k_min (the smallest k per input)")
            positive_int("k_min", self.k_min)
            if self.k_min > self.k:
                raise ValueError(f"k_min={self.k_min} is larger than k={self.k} (k is the largest k per input)")
        elif self.k_min is not None:
            raise ValueError(f"k_min is only used by 'adaptivek', not {self.architecture!r}")
        if "matryoshka_groups" in required:
            groups = self.matryoshka_groups
            if groups is None or len(groups) == 0:
                raise ValueError(f"architecture {self.architecture!r} needs matryoshka_groups ending at d_sae")
            groups = tuple(groups)
            for g in groups:
                positive_int("each of matryoshka_groups", g)
            if any(b <= a for a, b in zip(groups[:-1], groups[1:], strict=True)) or groups[-1] != self.d_sae:
                raise ValueError(
                    f"matryoshka_groups must increase strictly and end at d_sae={self.d_sae}; got {groups}"
                )
            object.__setattr__(self, "matryoshka_groups", groups)
        elif self.matryoshka_groups is not None:
            raise ValueError(f"matryoshka_groups is only used by 'matryoshka', not {self.architecture!r}")
        if self.dtype not in SAE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(SAE_DTYPES)}; got {self.dtype!r}")
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise ValueError(f"apply_b_dec_to_input must be True or False, got {self.apply_b_dec_to_input!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"model must be a string or None, got {self.model!r}")
        normalize_site(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build from a dict such as cfg.json; unknown or missing keys raise ValueError listing the valid ones."""
        reject_unknown_keys(cls, d)
        missing = [name for name in ("d_in", "d_sae", "architecture") if name not in d]
        if missing:
            raise ValueError(f"SAEConfig needs key(s) {missing}; valid keys: {', '.join(f.name for f in fields(cls))}")
        return cls(**with_tuples(d, *cls.TUPLES))

