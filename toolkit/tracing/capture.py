"""Read activations at named sites, stopping the forward pass after the last layer needed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from toolkit.errors import (
    ArgumentError,
    ContextLengthError,
    EmptyInputError,
    HookNotFoundError,
    check_positive_int,
)
from toolkit.progress import progress_bar
from toolkit.sites import Site
from toolkit.tracing.guard import exclusive

if TYPE_CHECKING:
    from toolkit.models import Model

Inputs = str | Sequence[str] | torch.Tensor | Mapping[str, torch.Tensor]


def envoy(model: Model, site: Site) -> Any:
    """The nnsight envoy of the module that `site` reads (the layer itself or one of its submodules)."""
    node = model.nn.model.layers[site.layer]
    for part in (site.submodule or "").split("."):
        if part:
            node = getattr(node, part)
    return node


def read_site(model: Model, site: Site) -> torch.Tensor:
    """Inside a trace: the activation at `site` (a real tensor in nnsight 0.8)."""
    e = envoy(model, site)
    return e.input if site.io == "input" else e.output


def write_site(model: Model, site: Site, value: torch.Tensor) -> None:
    """Inside a trace: replace the activation at `site` with `value`."""
    e = envoy(model, site)
    if site.io == "input":
        e.input = value
    else:
        e.output = value


def resolve_sites(model: Model, sites: str | Site | Sequence[str | Site]) -> list[Site]:
    """Validate sites against the model (before anything runs) and sort them in execution order."""
    if isinstance(sites, (str, Site)):
        sites = [sites]
    resolved = sorted({model.site(s) for s in sites}, key=lambda s: s.order)
    if not resolved:
        raise EmptyInputError("no sites given: name at least one, e.g. 'blocks.6.resid_post'")
    return resolved


def check_token_ids(model: Model, ids: torch.Tensor, what: str = "token ids") -> None:
    """ArgumentError unless every id lies in the model's vocabulary (an IndexError inside the trace otherwise)."""
    if ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= model.vocab_size:
            raise ArgumentError(f"{what} span {lo}..{hi}, but {model.name}'s vocabulary is 0..{model.vocab_size - 1}; "
                                "tokenize with this model's tokenizer")


def check_mask(mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`mask` if it is a 0/1 (or bool) tensor of the same shape as `ids`, else ArgumentError naming both."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ArgumentError(f"attention_mask must have the shape of the token ids {tuple(ids.shape)}; got {got}")
    if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ArgumentError(f"attention_mask must hold only 0 and 1 (an integer or bool tensor); got {mask.dtype} "
                            f"with values {mask.unique()[:6].tolist()}")
    return mask.long()


def to_batch(model: Model, inputs: Inputs, *, truncate: bool = False, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Turn prompts, a token tensor or a tokenizer dict into {input_ids, attention_mask} on the model's device.

    Token ids are checked against the vocabulary and a given mask against their shape, before anything runs."""
    if isinstance(inputs, str) or (isinstance(inputs, Sequence) and not isinstance(inputs, torch.Tensor)):
        return model.tokenize(inputs, truncate=truncate, padding_side=padding_side)
    if isinstance(inputs, torch.Tensor):
        ids, mask = inputs, None
    elif isinstance(inputs, Mapping):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        raise TypeError(f"inputs must be prompts, a LongTensor of token ids or a dict with input_ids; got {type(inputs).__name__}")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"input_ids must be an integer tensor (batch, seq); got {type(ids).__name__}")
    if ids.ndim == 1:
        ids = ids[None]
        mask = mask[None] if isinstance(mask, torch.Tensor) and mask.ndim == 1 else mask
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be an integer tensor (batch, seq); got {tuple(ids.shape)} {ids.dtype}")
    if ids.shape[1] == 0 or (ids.shape[1] == 1 and bool((ids == model.bos_token_id).all())):
        raise EmptyInputError(f"token ids of shape {tuple(ids.shape)} hold nothing besides BOS; give some text")
    if ids.shape[1] > model.max_context:
        raise ContextLengthError(f"{ids.shape[1]} tokens but the model's context is {model.max_context}; cut the input")
    check_token_ids(model, ids)
    mask = torch.ones_like(ids) if mask is None else check_mask(mask, ids)
    return {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}


def trace_batch(model: Model, batch: Mapping[str, torch.Tensor], sites: list[Site], *,
                stop_early: bool = True, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """One forward over `batch` returning {site name: activation}; sites must be sorted (see resolve_sites)."""
    if model.remote:  # on NDIF (toolkit.tracing.remote)
        from toolkit.tracing.remote import remote_forward, steps_for

        acts, _ = remote_forward(model, dict(batch), steps_for(model, [(s, "read", None) for s in sites]),
                                 batch["input_ids"] == model.bos_token_id, logits=not stop_early)
        return {s.name: a.detach().cpu() if to_cpu else a.detach() for s, a in zip(sites, acts, strict=True)}
    saved = {}
    with exclusive(model, "capture"), torch.no_grad(), model.nn.trace(dict(batch)) as tracer:
        for s in sites:
            saved[s.name] = read_site(model, s).save()
        if stop_early:
            tracer.stop()
    out = {}
    for name, t in saved.items():
        t = t.detach()
        out[name] = t.to("cpu", copy=True) if to_cpu else t
    return out


@dataclass
class Activations:
    """Activations per site `(batch, seq, width)` with the tokens and mask they came from."""

    acts: dict[str, torch.Tensor]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    bos_token_id: int | None = None

    def __getitem__(self, site: str | Site) -> torch.Tensor:
        key = Site.parse(site).name
        if key not in self.acts:
            raise HookNotFoundError(f"site {key!r} was not captured; captured: {', '.join(self.acts)}")
        return self.acts[key]

    @property
    def sites(self) -> list[str]:
        return list(self.acts)

    def tokens_only(self, site: str | Site, *, drop_bos: bool = True) -> torch.Tensor:
        """Rows `(n_tokens, width)` for real tokens only (pads and, by default, BOS removed)."""
        keep = self.attention_mask.bool().cpu()
        if drop_bos and self.bos_token_id is not None:
            keep &= self.input_ids.cpu() != self.bos_token_id
        return self[site].cpu()[keep]


def capture(model: Model, inputs: Inputs, sites: str | Site | Sequence[str | Site], *, batch_size: int = 8,
            stop_early: bool = True, truncate: bool = False, progress: bool = False) -> Activations:
    """Activations at `sites` for prompts (or token ids), batched; the model stops after the last layer needed.

    Safe to call from several threads on one model: each trace holds the model's lock (see toolkit.tracing.guard)."""
    batch_size = check_positive_int(batch_size, "batch_size")
    resolved = resolve_sites(model, sites)
    batch = to_batch(model, inputs, truncate=truncate)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    parts: dict[str, list[torch.Tensor]] = {s.name: [] for s in resolved}
    starts = range(0, ids.shape[0], batch_size)
    for i in progress_bar(starts, desc="capture", enabled=progress):
        sub = {"input_ids": ids[i:i + batch_size], "attention_mask": mask[i:i + batch_size]}
        for name, t in trace_batch(model, sub, resolved, stop_early=stop_early).items():
            parts[name].append(t)
    acts = {name: torch.cat(ts) for name, ts in parts.items()}
    return Activations(acts, ids.cpu(), mask.cpu(), model.bos_token_id)


def iter_capture(model: Model, contexts: torch.Tensor, sites: str | Site | Sequence[str | Site], *,
                 batch_size: int = 8, attention_mask: torch.Tensor | None = None, progress: bool = True,
                 desc: str | None = None, start: int = 0, stop_early: bool = True) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Stream activations over a corpus of token contexts `(n, ctx)`: yields (row offset, {site: (b, ctx, d)}).

    Each batch's trace holds the model's lock (thread-safe); the lock is free between yields."""
    batch_size = check_positive_int(batch_size, "batch_size")
    resolved = resolve_sites(model, sites)
    if not isinstance(contexts, torch.Tensor) or contexts.ndim != 2 or contexts.shape[0] == 0:
        got = tuple(contexts.shape) if isinstance(contexts, torch.Tensor) else type(contexts).__name__
        raise EmptyInputError(f"contexts must be a non-empty (n, ctx) token tensor; got {got}")
    if contexts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"contexts must be integer token ids, got {contexts.dtype}")
    check_token_ids(model, contexts, "contexts' token ids")
    if attention_mask is not None:
        attention_mask = check_mask(attention_mask, contexts)
    n = contexts.shape[0]
    bar = progress_bar(total=n - start, desc=desc or f"capture {', '.join(s.name for s in resolved)}",
                       enabled=progress, unit="ctx")
    try:
        for i in range(start, n, batch_size):
            ids = contexts[i:i + batch_size]
            mask = attention_mask[i:i + batch_size] if attention_mask is not None else torch.ones_like(ids)
            batch = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}
            yield i, trace_batch(model, batch, resolved, stop_early=stop_early)
            bar.update(ids.shape[0])
    finally:
        bar.close()
