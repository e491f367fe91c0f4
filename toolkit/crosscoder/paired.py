"""Paired activations: two models' activations at one site on the same tokens (capture, load from caches, split)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from toolkit.errors import ShapeMismatchError
from toolkit.sites import Site
from toolkit.tracing import iter_capture, paired_batches

if TYPE_CHECKING:
    from toolkit.models import Model
    from toolkit.tracing import ActivationCache


@dataclass
class PairedActivations:
    """Row-aligned activations of two models on the same tokens, tagged with where they come from."""

    acts: torch.Tensor
    """(n, 2, d): row i is token i seen by the base model ([:, 0]) and by the fine-tuned model ([:, 1])."""
    models: tuple[str, str] | None = None
    """(base, fine-tuned) model names; a crosscoder refuses activations of another pair."""
    site: str | None = None
    """Site name, e.g. 'blocks.11.resid_post'; a crosscoder refuses activations of another site."""
    tokens: torch.Tensor | None = None
    """(n_contexts, ctx_len) token ids the rows come from (for top-context views)."""
    positions: torch.Tensor | None = None
    """(n, 2) (context row, position) of each row in `tokens`."""

    def __post_init__(self) -> None:
        if not isinstance(self.acts, torch.Tensor) or self.acts.ndim != 3 or self.acts.shape[1] != 2:
            got = tuple(self.acts.shape) if isinstance(self.acts, torch.Tensor) else type(self.acts).__name__
            raise ShapeMismatchError(f"paired activations must be a (n, 2, d) tensor (base, fine-tuned); got {got}")
        if self.positions is not None and tuple(self.positions.shape) != (self.acts.shape[0], 2):
            raise ShapeMismatchError(f"positions must be ({self.acts.shape[0]}, 2), got {tuple(self.positions.shape)}")
        if self.site is not None:
            self.site = Site.parse(self.site).name
        if self.models is not None:
            self.models = tuple(self.models)

    def __len__(self) -> int:
        return self.acts.shape[0]

    @property
    def d(self) -> int:
        return self.acts.shape[-1]

    @classmethod
    def from_caches(cls, cache_base: ActivationCache, cache_ft: ActivationCache, *, site: str | None = None,
                    tokens: torch.Tensor | None = None) -> PairedActivations:
        """Load two complete activation caches of the same tokens (see toolkit.tracing.cache) into memory."""
        name = cache_site(cache_base, site)
        n = cache_base.n_tokens
        (acts,) = [b for b in paired_batches(cache_base, cache_ft, max(n, 1), site_a=name, site_b=site or name,
                                             shuffle=False, drop_last=False)] or [torch.empty(0, 2, cache_base.width(name))]
        positions = torch.cat([cache_base.token_positions(i) for i in range(len(cache_base))]) if len(cache_base) else None
        return cls(acts, (cache_base.cfg.model, cache_ft.cfg.model), name, tokens, positions)



def cache_site(cache: ActivationCache, site: str | Site | None) -> str:
    """The site to read from an activation cache: `site`, or its only one."""
    if site is not None:
        return Site.parse(site).name
    if len(cache.sites) != 1:
        raise ValueError(f"cache {str(cache.folder)!r} holds several sites {list(cache.sites)}; pass site=...")
    return cache.sites[0]



def capture_pair(base: Model, ft: Model, contexts: torch.Tensor, site: str | Site, *, batch_size: int = 8,
                 progress: bool = True) -> PairedActivations:
    """Activations of both models at `site` on the same token contexts `(n, ctx)`, BOS positions dropped."""
    site = base.site(site)
    ft.site(site)
    if base.site_width(site) != ft.site_width(site):
        raise ShapeMismatchError(f"site {site.name} is {base.site_width(site)} wide in {base.name} but "
                                 f"{ft.site_width(site)} in {ft.name}")
    keep = contexts != base.bos_token_id
    per_model = []
    for m in (base, ft):
        parts = [acts[site.name][keep[i:i + acts[site.name].shape[0]]]
                 for i, acts in iter_capture(m, contexts, [site], batch_size=batch_size, progress=progress,
                                             desc=f"capture {m.name} {site.name}")]
        per_model.append(torch.cat(parts).float())
    rows, pos = keep.nonzero(as_tuple=True)
    return PairedActivations(torch.stack(per_model, dim=1), (base.name, ft.name), site.name, contexts.clone(),
                             torch.stack([rows, pos], dim=1))



def split_paired(acts: PairedActivations, fractions: Sequence[float] = (0.9, 0.1)) -> list[PairedActivations]:
    """Split by whole contexts (not tokens) into parts, e.g. train / held-out; tags and tokens are kept."""
    if acts.positions is None:
        raise ValueError("split_paired needs positions (activations from capture_pair or from_caches)")
    n_ctx = int(acts.positions[:, 0].max()) + 1 if len(acts) else 0
    bounds = [round(sum(fractions[:i]) * n_ctx) for i in range(len(fractions) + 1)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        m = (acts.positions[:, 0] >= lo) & (acts.positions[:, 0] < hi)
        out.append(PairedActivations(acts.acts[m], acts.models, acts.site, acts.tokens, acts.positions[m]))
    return out
