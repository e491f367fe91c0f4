"""Edit activations at sites — add, replace, ablate, splice a function — in a forward pass or during generation."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from toolkit.errors import ArgumentError, NonFiniteError, ShapeMismatchError, check_finite, check_positive_int
from toolkit.sites import Site
from toolkit.tracing.capture import Inputs, read_site, resolve_sites, to_batch, write_site
from toolkit.tracing.guard import exclusive

if TYPE_CHECKING:
    from toolkit.models import Model

Positions = int | slice | Sequence[int] | None


def _select(positions: Positions) -> slice | list[int] | int:
    if positions is None:
        return slice(None)
    if isinstance(positions, (int, slice)):
        return positions
    return list(positions)


def _is_int(v: object) -> bool:
    return not isinstance(v, bool) and hasattr(v, "__index__")


def _check_positions_type(positions: Positions, site: Site) -> None:
    ok = positions is None or isinstance(positions, slice) or _is_int(positions) or (
        isinstance(positions, Sequence) and not isinstance(positions, str) and all(_is_int(p) for p in positions))
    if not ok:
        raise ArgumentError(f"positions of the edit at {site.name} must be None, an int, a slice or a list of ints; "
                            f"got {positions!r}")


def check_positions(edits: Sequence[Edit], seq_len: int) -> None:
    """ArgumentError for an edit whose integer positions fall outside a prompt of `seq_len` tokens (before running)."""
    for e in edits:
        p = e.positions
        ints = [] if p is None or isinstance(p, slice) else [p] if _is_int(p) else list(p)
        bad = [int(i) for i in ints if not -seq_len <= int(i) < seq_len]
        if bad:
            raise ArgumentError(f"positions {bad} of the edit at {e.site} are out of range for prompts of {seq_len} "
                                f"tokens (with BOS and padding): valid positions are {-seq_len}..{seq_len - 1}")


@dataclass(frozen=True)
class Edit:
    """Base of every edit: a site, optionally the token positions (in the prompt) it touches, and whether
    BOS positions are left alone (`skip_bos`: SAEs, like Gemma Scope's, are trained without BOS, whose
    activations are huge attention-sink outliers)."""

    site: str | Site
    positions: Positions = field(default=None, kw_only=True)
    skip_bos: bool = field(default=False, kw_only=True)

    def transform(self, act: torch.Tensor) -> torch.Tensor:
        """New activation for the selected positions; `act` is `(batch, n_positions, width)`."""
        raise NotImplementedError

    def check(self, model: Model) -> Site:
        """Validate against the model before anything runs."""
        s = model.site(self.site)
        _check_positions_type(self.positions, s)
        return s

    def apply(self, act: torch.Tensor, prompt_pass: bool = True, bos_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the edited activation (a new tensor; `act` is not modified); `bos_mask` (batch, seq) marks BOS."""
        if not prompt_pass and self.positions is not None:
            return act  # positions index the prompt; later generation steps see one new token each
        sel = _select(self.positions)
        out = act.clone()
        out[:, sel] = self.transform(act[:, sel]).to(act.dtype)
        if self.skip_bos and prompt_pass and bos_mask is not None:
            out = torch.where(bos_mask.to(act.device)[..., None], act, out)
        return out


def _check_vector(v: torch.Tensor, model: Model, site: Site, what: str) -> None:
    width = model.site_width(site)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise TypeError(f"{what} for site {site.name} must be a floating torch.Tensor of shape ({width},); got "
                        f"{getattr(v, 'dtype', type(v).__name__)}")
    if v.ndim == 0 or v.shape[-1] != width:
        raise ShapeMismatchError(f"{what} has width {v.shape[-1] if v.ndim else None} but site {site.name} of "
                                 f"{model.name} has width {width}")
    if v.ndim != 1:
        raise ShapeMismatchError(f"{what} has shape {tuple(v.shape)} but site {site.name} needs one vector of shape "
                                 f"({width},) (it is added at every selected position); take one row, e.g. v[0]")
    check_finite(v, f"the {what} for site {site.name}")


@dataclass(frozen=True)
class Add(Edit):
    """Add `scale * vector` (width of the site) — steering."""

    vector: torch.Tensor
    scale: float = 1.0

    def check(self, model: Model) -> Site:
        s = super().check(model)
        _check_vector(self.vector, model, s, "steering vector")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"scale of the Add at {s.name} must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale):
            raise NonFiniteError(f"scale of the Add at {s.name} must be finite, got {self.scale!r}")
        return s

    def transform(self, act: torch.Tensor) -> torch.Tensor:
        return act + self.scale * self.vector.to(act.device, act.dtype)


@dataclass(frozen=True)
class Replace(Edit):
    """Replace the activation with `value` (broadcast over batch and positions)."""

    value: torch.Tensor

    def check(self, model: Model) -> Site:
        s = super().check(model)
        _check_vector(self.value, model, s, "replacement")
        return s

    def transform(self, act: torch.Tensor) -> torch.Tensor:
        return self.value.to(act.device, act.dtype).expand_as(act)


@dataclass(frozen=True)
class Ablate(Edit):
    """Zero-ablate, or mean-ablate with `mean` (a width vector, e.g. from a corpus capture)."""

    mean: torch.Tensor | None = None

    def check(self, model: Model) -> Site:
        s = super().check(model)
        if self.mean is not None:
            _check_vector(self.mean, model, s, "ablation mean")
        return s

    def transform(self, act: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return torch.zeros_like(act)
        return self.mean.to(act.device, act.dtype).expand_as(act)


@dataclass(frozen=True)
class Splice(Edit):
    """Replace the activation with `fn(activation)` — e.g. an SAE's reconstruction; fn must keep the shape."""

    fn: Callable[[torch.Tensor], torch.Tensor]

    def transform(self, act: torch.Tensor) -> torch.Tensor:
        out = self.fn(act)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"spliced function at {self.site} returned {type(out).__name__}, not a tensor")
        if out.shape != act.shape:
            raise ShapeMismatchError(f"spliced function returned {tuple(out.shape)} for an activation of {tuple(act.shape)} at {self.site}")
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(act).all()):
            check_finite(out, f"what the spliced function at {self.site} returned for finite activations")
        return out


def _plan(model: Model, edits: Sequence[Edit]) -> list[tuple[Site, list[Edit]]]:
    """Group edits by site in execution order; validation happens here, before the model runs."""
    by_site: dict[Site, list[Edit]] = {}
    for e in edits:
        if not isinstance(e, Edit):
            raise TypeError(f"edits must be Add/Replace/Ablate/Splice objects, got {type(e).__name__}")
        by_site.setdefault(e.check(model), []).append(e)
    return [(s, by_site[s]) for s in sorted(by_site, key=lambda s: s.order)]


def _apply_all(model: Model, plan: list[tuple[Site, list[Edit]]], prompt_pass: bool,
               bos_mask: torch.Tensor | None = None) -> None:
    for s, site_edits in plan:
        act = read_site(model, s)
        for e in site_edits:
            act = e.apply(act, prompt_pass=prompt_pass, bos_mask=bos_mask)
        write_site(model, s, act)


def run_with_edits(model: Model, inputs: Inputs, edits: Sequence[Edit] = (), *,
                   capture: Sequence[str | Site] = (), grad: bool = False, truncate: bool = False,
                   logits_to_keep: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass with `edits` applied; returns (final logits, {captured site: activation after edits}).

    `logits_to_keep=n` returns the logits of the last n positions only, (batch, n, vocab): with Gemma's 262k
    vocabulary every position's logits cost 1 MB, so a scorer that reads the last token should ask for 1.

    The logits are the model's own output (Gemma-2's soft-capped logits, not `lm_head.output`). Safe to call
    from several threads on one model (the trace holds the model's lock); calling it from inside an edit's
    function or another trace raises NestedTraceError.
    """
    plan = _plan(model, edits)
    if logits_to_keep is not None:
        check_positive_int(logits_to_keep, "logits_to_keep")
    cap = resolve_sites(model, capture) if capture else []
    batch = to_batch(model, inputs, truncate=truncate)
    check_positions(edits, batch["input_ids"].shape[1])
    steps = sorted([(s, "edit", es) for s, es in plan] + [(s, "read", None) for s in cap],
                   key=lambda x: (x[0].order, x[1] == "read"))
    saved = {}
    bos_mask = batch["input_ids"] == model.bos_token_id
    if model.remote:  # on NDIF (toolkit.tracing.remote)
        from toolkit.tracing.remote import remote_forward, steps_for

        if grad:
            raise ArgumentError(f"grad=True needs {model.name} here: NDIF returns saved values, not a graph to "
                                "backpropagate through; load the model locally for gradients")

        acts, logits = remote_forward(model, batch, steps_for(model, steps), bos_mask)
        logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        return logits, {s.name: a for (s, kind, _), a in zip([x for x in steps if x[1] == "read"], acts, strict=True)}
    keep = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    with exclusive(model, "run_with_edits"), torch.set_grad_enabled(grad), model.nn.trace(batch, **keep):
        for s, kind, es in steps:
            if kind == "edit":
                _apply_all(model, [(s, es)], prompt_pass=True, bos_mask=bos_mask)
            else:
                saved[s.name] = read_site(model, s).save()
        logits = model.nn.output.logits.save()
    return logits, dict(saved)


def generation_kwargs(model: Model, max_new_tokens: int, do_sample: bool, temperature: float,
                      min_new_tokens: int | None = None) -> dict[str, object]:
    """Hugging Face `generate` arguments, validated (ArgumentError naming the bad one) before any work."""
    kwargs: dict[str, object] = {"max_new_tokens": check_positive_int(max_new_tokens, "max_new_tokens"),
                                 "do_sample": bool(do_sample), "pad_token_id": model.tokenizer.pad_token_id}
    if min_new_tokens is not None:
        kwargs["min_new_tokens"] = check_positive_int(min_new_tokens, "min_new_tokens")
    if do_sample:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not (math.isfinite(temperature) and temperature > 0):
            raise ArgumentError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
        kwargs["temperature"] = float(temperature)
    return kwargs


def generate(model: Model, prompts: str | Sequence[str], edits: Sequence[Edit] = (), *, max_new_tokens: int = 20,
             do_sample: bool = False, temperature: float = 1.0, seed: int | None = None,
             truncate: bool = False) -> list[str]:
    """Generate continuations with `edits` applied at every step; returns only the new text per prompt.

    Thread-safe on one model: the whole generation holds the model's lock (see toolkit.tracing.guard)."""
    plan = _plan(model, edits)
    batch = to_batch(model, [prompts] if isinstance(prompts, str) else list(prompts), truncate=truncate,
                     padding_side="left")
    check_positions(edits, batch["input_ids"].shape[1])
    bos_mask = batch["input_ids"] == model.bos_token_id
    kwargs = generation_kwargs(model, max_new_tokens, do_sample, temperature)
    if model.remote:  # on NDIF (toolkit.tracing.remote); sampling uses the service's RNG
        from toolkit.tracing.remote import remote_generate, steps_for

        out = remote_generate(model, batch, steps_for(model, [(s, "edit", es) for s, es in plan]), bos_mask, kwargs)
        return model.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    with exclusive(model, "generate"), \
            torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad(), warnings.catch_warnings():
            # an open `tracer.all()` loop ends when generation does; nnsight warns about that by design
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with model.nn.generate(**kwargs) as tracer:
                with tracer.invoke(batch):
                    if plan:
                        for step in tracer.all():
                            _apply_all(model, plan, prompt_pass=(step == 0), bos_mask=bos_mask)
                with tracer.invoke():
                    out = tracer.result.save()
    new = out[:, batch["input_ids"].shape[1]:]
    return model.tokenizer.batch_decode(new, skip_special_tokens=True)

