"""Attention patterns read through the trace equal Hugging Face's own attention weights."""

from __future__ import annotations

import pytest
import torch

from toolkit.errors import EmptyInputError, HookNotFoundError
from toolkit.tracing.attention import attention_patterns


def test_patterns_equal_hf_output_attentions(tiny):
    prompt = "the quick brown fox jumps over the lazy dog"
    got = attention_patterns(tiny, prompt)
    batch = tiny.tokenize(prompt)
    with torch.no_grad():
        ref = tiny.hf(**batch, output_attentions=True).attentions
    assert got.layers == [0, 1]
    assert got.pattern.shape == (2, tiny.n_heads, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    for i in range(2):
        torch.testing.assert_close(got.pattern[i], ref[i][0].float())
    assert torch.allclose(got.pattern.sum(-1), torch.ones(()))
    assert torch.triu(got.pattern, 1).abs().max() == 0  # causal
    assert got.tokens[0] == tiny.tokenizer.bos_token


def test_one_layer_and_lookup(tiny):
    got = attention_patterns(tiny, "hello there", layers=1)
    assert got.layers == [1] and got.layer(1).shape[0] == tiny.n_heads
    with pytest.raises(KeyError, match="captured: \\[1\\]"):
        got.layer(0)


def test_bad_layer_and_empty_prompt_fail_before_running(tiny):
    with pytest.raises(HookNotFoundError, match="layer"):
        attention_patterns(tiny, "hello", layers=[0, 5])
    with pytest.raises(EmptyInputError):
        attention_patterns(tiny, "")
    with pytest.raises(TypeError, match="one string"):
        attention_patterns(tiny, ["a", "b"])
