"""Generation with edits through plain PyTorch hooks: the same edits and results as `generate`, without the
per-step cost of an nnsight trace (for steering, where every generated token runs the edits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from toolkit.sites import Site, module_path
from toolkit.tracing.capture import to_batch
from toolkit.tracing.guard import exclusive
from toolkit.tracing.intervene import Edit, _plan, check_positions, generation_kwargs

if TYPE_CHECKING:
    from toolkit.models import Model


def _apply(edits: list[Edit], act: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    prompt_pass = state["step"] == 0
    for e in edits:
        act = e.apply(act, prompt_pass=prompt_pass, bos_mask=state["bos"] if prompt_pass else None)
    return act


def _hook(site: Site, edits: list[Edit], module: torch.nn.Module, state: dict[str, Any]) -> Any:
    if site.io == "input":
        def pre(mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (_apply(edits, args[0], state), *args[1:]), kwargs
            key = next(iter(kwargs))  # decoder layers take hidden_states by keyword in some versions
            return args, {**kwargs, key: _apply(edits, kwargs[key], state)}
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod: Any, args: tuple, out: Any) -> Any:
        if isinstance(out, tuple):
            return (_apply(edits, out[0], state), *out[1:])
        return _apply(edits, out, state)
    return module.register_forward_hook(post)


@contextlib.contextmanager
def hooked(model: Model, edits: Sequence[Edit], bos_mask: torch.Tensor | None) -> Iterator[dict[str, Any]]:
    """Install `edits` as hooks for the duration of the block; forward number 0 is the prompt pass."""
    plan = _plan(model, edits)
    state: dict[str, Any] = {"step": -1, "bos": bos_mask}
    handles = [model.hf.register_forward_pre_hook(lambda mod, args: state.__setitem__("step", state["step"] + 1))]
    try:
        for site, site_edits in plan:
            handles.append(_hook(site, site_edits, model.hf.get_submodule(module_path(site)), state))
        yield state
    finally:
        for h in handles:
            h.remove()


def generate_hooked(model: Model, prompts: str | Sequence[str], edits: Sequence[Edit] = (), *,
                    max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                    seed: int | None = None, truncate: bool = False, min_new_tokens: int | None = None) -> list[str]:
    """Like `toolkit.tracing.generate` (same edits, positions and BOS handling), with PyTorch hooks.

    The hooks live on the shared module, so the generation holds the model's lock from installing them to
    removing them: concurrent calls on one model are serialized, never see each other's edits."""
    batch = to_batch(model, [prompts] if isinstance(prompts, str) else list(prompts), truncate=truncate,
                     padding_side="left")
    _plan(model, edits)  # validate every edit before any work
    check_positions(edits, batch["input_ids"].shape[1])
    kwargs = generation_kwargs(model, max_new_tokens, do_sample, temperature, min_new_tokens)
    bos = batch["input_ids"] == model.bos_token_id
    with exclusive(model, "generate_hooked"), \
            torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad(), hooked(model, edits, bos):
            out = model.hf.generate(**batch, **kwargs)
    return model.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
