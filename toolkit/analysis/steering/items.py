"""Steering items: one SAE latent or one vector, a method, a strength in natural units, and the positions.

Strength units ("strength 1" means):
- latent add / clamp: `strength * unit` is an activation value of the latent; `unit` is the latent's measured
  max activation when built with `latent_unit` (so 1 = "as strongly as it ever fires"), else 1 (raw units).
  add puts `value * W_dec[latent]` into the stream (what the latent contributes at that activation); clamp sets
  the latent's code to `value` at every steered token (encode -> set -> decode, SAE error term kept).
- latent scale: the code is multiplied by `strength` (1 = unchanged, 0 = ablated, -1 = sign flipped).
- latent ablate: the code is set to 0 (strength unused).
- vector add: adds `strength * unit * v / |v|`; `unit` defaults to |v| (strength 1 adds v as given) and
  `site_unit` measures the median residual norm at the site (then 1 = "one typical activation's norm").
- vector project_out: removes `strength` times the component along v (1 = removed entirely).
- vector cap: the projection on v/|v| is capped at `strength * unit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from toolkit.errors import NonFiniteError, ShapeMismatchError, SiteMismatchError
from toolkit.sae.sae import SAE
from toolkit.sites import Site

if TYPE_CHECKING:
    from toolkit.models import Model

LATENT_METHODS = ("add", "clamp", "scale", "ablate")
VECTOR_METHODS = ("add", "project_out", "cap")
POSITIONS = ("all", "prompt", "generated")
# default slider ranges per method, in units of `unit` (the widget may override them)
DEFAULT_RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("latent", "add"): (-2.0, 2.0), ("latent", "clamp"): (-1.0, 3.0), ("latent", "scale"): (-2.0, 4.0),
    ("latent", "ablate"): (0.0, 1.0), ("vector", "add"): (-2.0, 2.0), ("vector", "project_out"): (0.0, 1.0),
    ("vector", "cap"): (-2.0, 2.0),
}

Positions = Literal["all", "prompt", "generated"]


def check_strength(value: Any, what: str = "strength") -> float:
    """`value` as a finite float, else NonFiniteError / TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise TypeError(f"{what} must be a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise NonFiniteError(f"{what} must be finite, got {v}")
    return v


def _check_unit(unit: Any) -> float:
    u = check_strength(unit, "unit")
    if u <= 0:
        raise ValueError(f"unit must be a positive scale (e.g. a max activation or a median norm), got {u}")
    return u


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class LatentSteer:
    """Steer with SAE latent `latent` of `sae` at `site` (default: the site the SAE was trained on)."""

    sae: SAE
    latent: int
    method: str = "add"
    strength: float = 1.0
    unit: float = 1.0
    positions: Positions = "all"
    site: str | None = None
    name: str | None = None
    sae_name: str | None = None
    """Key of the SAE in the `saes` mapping that to_code()/from_items() use (default: the site name)."""
    kind: str = field(default="latent", init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.sae, SAE):
            raise TypeError(f"sae must be a toolkit SAE, got {type(self.sae).__name__}")
        object.__setattr__(self, "latent", self.sae.check_feature(self.latent))
        _check_choice(self.method, LATENT_METHODS, "latent method")
        _check_choice(self.positions, POSITIONS, "positions")
        object.__setattr__(self, "strength", check_strength(self.strength))
        object.__setattr__(self, "unit", _check_unit(self.unit))
        trained = self.sae.cfg.site
        if self.site is None and trained is None:
            raise ValueError(f"{self.sae.name} does not know its site; pass site='blocks.<layer>.<kind>'")
        site = Site.parse(self.site if self.site is not None else trained).name
        if trained is not None and Site.parse(trained).name != site:
            raise SiteMismatchError(f"{self.sae.name} was trained on {trained}, not {site}; steer its latents at "
                                    f"{trained}, use an SAE trained on {site}, or sae.at_site({site!r}) on purpose")
        object.__setattr__(self, "site", site)
        object.__setattr__(self, "sae_name", self.sae_name or site)
        object.__setattr__(self, "name", self.name or f"{site}/{self.latent}")

    def with_strength(self, strength: float) -> LatentSteer:
        return replace(self, strength=strength)

    @property
    def value(self) -> float:
        """The activation value (add/clamp), the factor (scale) or 0 (ablate) this item applies."""
        if self.method == "ablate":
            return 0.0
        return self.strength if self.method == "scale" else self.strength * self.unit

    def direction(self) -> torch.Tensor:
        """The latent's decoder row in activation units (what one unit of activation adds)."""
        return (self.sae.W_dec[self.latent] / self.sae.input_scale).detach()

    def check(self, model: Model) -> Site:
        return self.sae.check_compatible(model, self.site)


@dataclass(frozen=True, eq=False)
class VectorSteer:
    """Steer along `vector` (width of `site`) with `method`; see the module docstring for units."""

    vector: torch.Tensor
    site: str
    method: str = "add"
    strength: float = 1.0
    unit: float | None = None
    positions: Positions = "all"
    name: str | None = None
    kind: str = field(default="vector", init=False, repr=False)

    def __post_init__(self) -> None:
        v = self.vector
        if not isinstance(v, torch.Tensor) or v.ndim != 1 or not v.is_floating_point():
            raise TypeError(f"vector must be a 1-D floating torch.Tensor, got "
                            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise NonFiniteError(f"steering vector {self.name or ''} holds {bad} NaN/inf values")
        norm = float(v.norm())
        if norm == 0:
            raise ValueError("steering vector is all zeros; it has no direction")
        object.__setattr__(self, "vector", v.detach().float().cpu())
        object.__setattr__(self, "site", Site.parse(self.site).name)
        _check_choice(self.method, VECTOR_METHODS, "vector method")
        _check_choice(self.positions, POSITIONS, "positions")
        object.__setattr__(self, "strength", check_strength(self.strength))
        object.__setattr__(self, "unit", _check_unit(norm if self.unit is None else self.unit))
        object.__setattr__(self, "name", self.name or f"vector@{self.site}")

    def with_strength(self, strength: float) -> VectorSteer:
        return replace(self, strength=strength)

    def direction(self) -> torch.Tensor:
        """The unit direction v / |v|."""
        return self.vector / self.vector.norm()

    def check(self, model: Model) -> Site:
        s = model.site(self.site)
        width = model.site_width(s)
        if self.vector.shape[0] != width:
            raise ShapeMismatchError(f"steering vector {self.name} has width {self.vector.shape[0]} but site "
                                     f"{s.name} of {model.name} has width {width}")
        return s


Item = LatentSteer | VectorSteer

