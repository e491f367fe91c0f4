"""Attention patterns (softmax weights per head) of one prompt, read with the model's eager attention kernel."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from toolkit.tracing.capture import to_batch
from toolkit.tracing.guard import exclusive

if TYPE_CHECKING:
    from toolkit.models import Model


@dataclass
class AttentionPatterns:
    """`pattern[i, h, q, k]`: how much query token q of head h attends to key token k at `layers[i]`."""

    tokens: list[str]
    layers: list[int]
    pattern: torch.Tensor

    def layer(self, layer: int) -> torch.Tensor:
        """The `(heads, q, k)` pattern of one captured layer."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not captured; captured: {self.layers}")
        return self.pattern[self.layers.index(layer)]


@contextmanager
def eager_attention(model: Model) -> Iterator[None]:
    """Switch the model to the eager attention kernel (the only one that returns weights), then back."""
    old = model.hf.config._attn_implementation
    if old == "eager":
        yield
        return
    model.hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.hf.set_attn_implementation(old)


def attention_patterns(model: Model, prompt: str, layers: int | Sequence[int] | None = None) -> AttentionPatterns:
    """Attention weights of `prompt` at `layers` (default: all), stopping after the last layer read."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string, got {type(prompt).__name__}")
    wanted = range(model.n_layers) if layers is None else [layers] if isinstance(layers, int) else layers
    # validate every layer before the model runs (HookNotFoundError lists the valid ones)
    order = sorted({model.site(f"blocks.{layer}.attn_out").layer for layer in wanted})
    batch = to_batch(model, prompt)
    saved = []
    with exclusive(model, "attention_patterns"), eager_attention(model), torch.no_grad(), \
            model.nn.trace(dict(batch)) as tracer:
        for layer in order:
            saved.append(model.nn.model.layers[layer].self_attn.output[1].save())
        tracer.stop()
    pattern = torch.stack([w[0].detach().float().cpu() for w in saved])
    tokens = model.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    return AttentionPatterns(tokens, order, pattern)
