"""One edit for the SAE-latent interventions of the unlearning and detoxification recipes.

At every steered position (BOS left alone): encode, change the chosen latents' codes, and add the change
through the decoder, so the SAE's reconstruction error is kept. Modes:
- `zero`: set the latents to 0 where they are active (conditional ablation);
- `negative`: set them to -value where they are active (Farrell et al.'s negative clamping);
- `scale`: multiply their codes by value;
- `subtract`: subtract value x decoder row at every position, active or not (constant subtraction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from toolkit.errors import ArgumentError, EmptyInputError, NonFiniteError
from toolkit.tracing.intervene import Edit

if TYPE_CHECKING:
    from toolkit.models import Model
    from toolkit.sites import Site

MODES = ("zero", "negative", "scale", "subtract")


@dataclass(frozen=True)
class LatentEdit(Edit):
    """Change SAE latents `latents` at the SAE's site by `mode` with `value` (see the module docstring)."""

    sae: Any = None
    latents: Sequence[int] = ()
    mode: str = "negative"
    value: float = 1.0
    skip_bos: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        if self.sae is None:
            raise ArgumentError("LatentEdit needs the SAE whose latents it edits")
        if isinstance(self.latents, (int, str)) or not len(self.latents):
            raise EmptyInputError("latents is empty; give a list of latent indices to edit")
        object.__setattr__(self, "latents", tuple(self.sae.check_feature(i) for i in self.latents))
        if self.mode not in MODES:
            raise ArgumentError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise NonFiniteError(f"value must be a finite number, got {self.value!r}")

    def check(self, model: Model) -> Site:
        s = super().check(model)
        self.sae.check_compatible(model, s)
        return s

    def transform(self, act: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor(self.latents, device=self.sae.device)
        rows = (self.sae.W_dec.detach()[idx] / self.sae.input_scale).to(act.device, act.dtype)
        if self.mode == "subtract":
            return act - self.value * rows.sum(0)
        old = self.sae.encode(act.to(self.sae.device, self.sae.dtype))[..., idx].to(act.dtype)
        if self.mode == "scale":
            new = old * self.value
        else:
            new = torch.where(old > 0, torch.full_like(old, 0.0 if self.mode == "zero" else -self.value), old)
        return act + (new - old).to(act.device) @ rows
