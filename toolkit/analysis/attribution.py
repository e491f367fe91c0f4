"""Attribution patching: gradient x activation of a scalar metric to SAE latents and to sites/positions.

At each SAE's site the forward becomes x + (z @ W_dec) / input_scale with z = 0 (the SAE error term is kept, so
the forward is exactly unchanged) and attribution(latent, position) = d metric / d z * code: the first-order
estimate of the metric's change when the latent is ablated there is minus this number. For a plain site,
attribution(position) = d metric / d x . x (the first-order change when x is zero-ablated is minus this).
BOS positions are left alone (as SAE splices do) and get attribution 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from toolkit.analysis.table import Table
from toolkit.errors import EmptyInputError, check_finite
from toolkit.sae.sae import SAE
from toolkit.tracing import Splice, run_with_edits
from toolkit.tracing.capture import to_batch

if TYPE_CHECKING:
    from toolkit.models import Model

Metric = Callable[[torch.Tensor], torch.Tensor]
"""logits (seq, vocab) of the one prompt -> a scalar tensor."""


def _token_id(model: Model, token: str | int) -> int:
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < model.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary 0..{model.vocab_size - 1}")
        return token
    if not isinstance(token, str):
        raise TypeError(f"a token is a string or an id, got {token!r}")
    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens ({ids}); give a string that is exactly one token "
                         f"(mind the leading space) or a token id")
    return ids[0]


def logprob(model: Model, token: str | int, position: int = -1) -> Metric:
    """Metric: the log-probability of `token` at `position` (default: the next-token prediction)."""
    t = _token_id(model, token)
    return lambda logits: torch.log_softmax(logits[position].float(), -1)[t]


def logit_diff(model: Model, token: str | int, other: str | int, position: int = -1) -> Metric:
    """Metric: logit(token) - logit(other) at `position`."""
    a, b = _token_id(model, token), _token_id(model, other)
    return lambda logits: logits[position, a].float() - logits[position, b].float()


@dataclass
class Attribution:
    """What `attribute` found for one prompt."""

    tokens: list[str]
    metric: float
    codes: dict[str, torch.Tensor]
    """{site: (seq, d_sae)} latent activations."""
    latents: dict[str, torch.Tensor]
    """{site: (seq, d_sae)} gradient x activation per latent and position."""
    sites: dict[str, torch.Tensor]
    """{site: (seq,)} gradient x activation per position, summed over the site's width."""

    def top(self, k: int = 10, *, by_position: bool = True, absolute: bool = True) -> Table:
        """The k largest latent attributions (per latent and position, or summed over positions)."""
        rows = []
        for site, attr in self.latents.items():
            a = attr if by_position else attr.sum(0, keepdim=True)
            flat = (a.abs() if absolute else a).flatten()
            for j in flat.topk(min(k, flat.numel())).indices.tolist():
                pos, lat = divmod(j, a.shape[1])
                row = {"site": site, "latent": lat, "attribution": float(a[pos, lat])}
                if by_position:
                    row = {"site": site, "position": pos, "token": self.tokens[pos], "latent": lat,
                           "activation": float(self.codes[site][pos, lat]), "attribution": float(a[pos, lat])}
                rows.append(row)
        rows.sort(key=lambda r: -abs(r["attribution"]) if absolute else -r["attribution"])
        return Table(rows[:k])

    def positions(self) -> Table:
        """Per site and position: the attribution of the whole activation there."""
        return Table([{"site": s, "position": p, "token": self.tokens[p], "attribution": float(v)}
                      for s, a in self.sites.items() for p, v in enumerate(a.tolist())])


def _latent_splice(model: Model, sae: SAE, store: dict[str, Any]) -> Splice:
    site = sae.check_compatible(model, sae.cfg.site) if sae.cfg.site else None
    if site is None:
        raise ValueError(f"{sae.name} does not know its site; set sae.cfg.site")

    def fn(x: torch.Tensor) -> torch.Tensor:
        xs = x.to(sae.device)
        with torch.no_grad():
            codes = sae.encode(xs)
        z = torch.zeros_like(codes, requires_grad=True)
        store[site.name] = (codes.detach(), z)
        return (xs + (z @ sae.W_dec.detach()) / sae.input_scale).to(x.device, x.dtype)

    return Splice(site, fn, skip_bos=True)


def _site_splice(model: Model, site: str, store: dict[str, Any]) -> Splice:
    s = model.site(site)

    def fn(x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x, requires_grad=True)
        store[s.name] = (x.detach(), z)
        return x + z

    return Splice(s, fn, skip_bos=True)


def attribute(model: Model, prompt: str | torch.Tensor, metric: Metric, *, saes: SAE | Sequence[SAE] = (),
              sites: str | Sequence[str] = ()) -> Attribution:
    """Gradient x activation of `metric(logits)` for one prompt to the latents of `saes` (each at its own site)
    and to the activations at `sites`, in one forward and one backward pass."""
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    sites = [sites] if isinstance(sites, str) else list(sites)
    if not saes and not sites:
        raise EmptyInputError("attribute needs at least one SAE (saes=...) or site (sites=...)")
    batch = to_batch(model, [prompt] if isinstance(prompt, str) else prompt)
    if batch["input_ids"].shape[0] != 1:
        raise ValueError(f"attribute explains one prompt at a time; got a batch of {batch['input_ids'].shape[0]}")
    lat_store: dict[str, Any] = {}
    site_store: dict[str, Any] = {}
    edits = [_latent_splice(model, sae, lat_store) for sae in saes]
    seen = {e.site.name for e in edits}
    dup = [sae.cfg.site for sae in saes if sum(sae.cfg.site == o.cfg.site for o in saes) > 1]
    if dup:
        raise ValueError(f"one SAE per site: several SAEs given for {sorted(set(dup))}")
    edits += [_site_splice(model, s, site_store) for s in sites if model.site(s).name not in seen]
    edits += [_site_splice(model, s, site_store) for s in sites if model.site(s).name in seen]
    logits, _ = run_with_edits(model, batch, edits, grad=True)
    for name, (c, _) in lat_store.items():
        check_finite(c, f"SAE codes at {name}")
    for name, (x, _) in site_store.items():
        check_finite(x, f"activations at {name}")
    with torch.enable_grad():  # notebooks often turn gradients off globally
        value = metric(logits[0])
        if value.ndim != 0:
            raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
        leaves = [z for _, z in lat_store.values()] + [z for _, z in site_store.values()]
        check_finite(value.detach(), "the metric's value")
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    for gz in grads:
        if gz is not None:
            check_finite(gz, "the gradients of the metric")
    g = iter(grads)
    latents, codes, site_attr = {}, {}, {}
    for name, (c, z) in lat_store.items():
        gz = next(g)
        gz = torch.zeros_like(z) if gz is None else gz
        latents[name], codes[name] = (gz * c)[0].detach().float().cpu(), c[0].float().cpu()
    for name, (x, z) in site_store.items():
        gz = next(g)
        gz = torch.zeros_like(z) if gz is None else gz
        site_attr[name] = (gz * x).sum(-1)[0].detach().float().cpu()
    tokens = model.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    return Attribution(tokens, float(value.detach()), codes, latents, site_attr)
