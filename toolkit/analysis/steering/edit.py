"""The edit that applies every steering item of one site: one SAE pass per SAE, BOS left untouched.

Order at a site: SAE latent edits (clamp/scale/ablate, computed from the incoming activation; one encode per
SAE however many latents), then every addition (latent or vector add, pre-summed into one vector), then
projections and caps in the spec's order (so a cap holds in the output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from toolkit.analysis.steering.items import Item, LatentSteer, VectorSteer
from toolkit.sae.sae import SAE
from toolkit.sites import Site
from toolkit.tracing.intervene import Edit

if TYPE_CHECKING:
    from toolkit.models import Model


@dataclass
class _CodeEdit:
    """new_code = old * mul + const for the latents `idx` of one SAE; `rows` = their decoder rows (k, d)."""

    sae: SAE
    idx: torch.Tensor
    mul: torch.Tensor
    const: torch.Tensor
    rows: torch.Tensor


@dataclass
class _Phase:
    """Everything one phase (prompt pass or a generated token) applies at the site, precomputed."""

    codes: list[_CodeEdit] = field(default_factory=list)
    add: torch.Tensor | None = None
    projections: list[tuple[str, torch.Tensor, float]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.codes and self.add is None and not self.projections


def _code_edits(items: list[LatentSteer]) -> list[_CodeEdit]:
    by_sae: dict[int, tuple[SAE, dict[int, tuple[float, float]]]] = {}
    for it in items:
        _, lat = by_sae.setdefault(id(it.sae), (it.sae, {}))
        mul, const = lat.get(it.latent, (1.0, 0.0))
        # compose with earlier items on the same latent: (old*m + c) then this item
        if it.method == "scale":
            lat[it.latent] = (mul * it.value, const * it.value)
        else:  # clamp or ablate: a constant
            lat[it.latent] = (0.0, it.value)
    out = []
    for sae, lat in by_sae.values():
        idx = torch.tensor(sorted(lat), dtype=torch.long)
        mul = torch.tensor([lat[i][0] for i in idx.tolist()])
        const = torch.tensor([lat[i][1] for i in idx.tolist()])
        rows = (sae.W_dec.detach()[idx.to(sae.device)] / sae.input_scale).float().cpu()
        out.append(_CodeEdit(sae, idx, mul, const, rows))
    return out


def _phase(items: list[Item]) -> _Phase:
    ph = _Phase(codes=_code_edits([i for i in items if isinstance(i, LatentSteer) and i.method != "add"]))
    adds = [i.value * i.direction().float().cpu() if isinstance(i, LatentSteer) else i.strength * i.unit * i.direction()
            for i in items if i.method == "add"]
    if adds:
        ph.add = torch.stack(adds).sum(0)
    for i in items:
        if isinstance(i, VectorSteer) and i.method != "add":
            ph.projections.append((i.method, i.direction(), i.strength if i.method == "project_out" else i.strength * i.unit))
    return ph


def _to(ph: _Phase, device: torch.device, dtype: torch.dtype) -> _Phase:
    return _Phase(
        codes=[_CodeEdit(c.sae, c.idx.to(c.sae.device), c.mul.to(c.sae.device, c.sae.dtype),
                         c.const.to(c.sae.device, c.sae.dtype), c.rows.to(device, dtype)) for c in ph.codes],
        add=None if ph.add is None else ph.add.to(device, dtype),
        projections=[(m, d.to(device, dtype), v) for m, d, v in ph.projections],
    )


@dataclass(frozen=True)
class SiteSteer(Edit):
    """All steering items of one site as one tracing edit (built by SteeringSpec.edits)."""

    items: tuple[Item, ...] = ()
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def check(self, model: Model) -> Site:
        s = model.site(self.site)
        for it in self.items:
            it.check(model)
        return s

    def _plan(self, prompt_pass: bool, device: torch.device, dtype: torch.dtype) -> _Phase:
        key = (prompt_pass, device, dtype)
        if key not in self._cache:
            phase = "prompt" if prompt_pass else "generated"
            self._cache[key] = _to(_phase([i for i in self.items if i.positions in ("all", phase)]), device, dtype)
        return self._cache[key]

    def apply(self, act: torch.Tensor, prompt_pass: bool = True, bos_mask: torch.Tensor | None = None) -> torch.Tensor:
        ph = self._plan(prompt_pass, act.device, act.dtype)
        if ph.empty:
            return act
        out = steer_activation(act, ph)
        if prompt_pass and bos_mask is not None:
            out = torch.where(bos_mask.to(act.device)[..., None], act, out)
        return out


def steer_activation(act: torch.Tensor, ph: _Phase) -> torch.Tensor:
    """Apply one phase's edits to `act` (..., d)."""
    out = act
    for c in ph.codes:
        old = c.sae.encode(act.to(c.sae.device))[..., c.idx]
        change = old * (c.mul - 1) + c.const
        out = out + (change.to(act.device, act.dtype) @ c.rows)
    if ph.add is not None:
        out = out + ph.add
    for method, d, v in ph.projections:
        proj = out @ d
        if method == "project_out":
            out = out - (v * proj)[..., None] * d
        else:
            out = out + (proj.clamp(max=v) - proj)[..., None] * d
    return out
