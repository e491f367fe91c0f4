"""Hook-based generation gives exactly what the nnsight path gives, and leaves no hook behind."""

import pytest
import torch

from toolkit.errors import ShapeMismatchError
from toolkit.tracing import Add, Splice, generate
from toolkit.tracing.hooked import generate_hooked

PROMPTS = ["The cat sat", "Paris is the capital of"]


@pytest.mark.parametrize("site", ["blocks.0.resid_pre", "blocks.0.attn_z", "blocks.0.attn_out", "blocks.1.resid_mid",
                                  "blocks.1.mlp_post", "blocks.1.mlp_out", "blocks.1.resid_post"])
def test_same_generations_as_the_traced_path(tiny, site):
    w = tiny.site_width(site)
    v = 20 * torch.randn(w)
    edits = [Add(site, v, skip_bos=True), Splice(site, lambda x: 0.5 * x, positions=[1, 2])]
    want = generate(tiny, PROMPTS, edits, max_new_tokens=6)
    assert generate_hooked(tiny, PROMPTS, edits, max_new_tokens=6) == want
    assert want != generate(tiny, PROMPTS, max_new_tokens=6)


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def test_no_edits_equals_plain_and_hooks_are_removed(tiny):
    before = _n_hooks(tiny)
    plain = generate(tiny, PROMPTS, max_new_tokens=5)
    assert generate_hooked(tiny, PROMPTS, max_new_tokens=5) == plain
    with pytest.raises(ShapeMismatchError):
        generate_hooked(tiny, PROMPTS, [Add("blocks.0.resid_post", torch.ones(3))])

    def boom(x):
        raise RuntimeError("edit failed")
    with pytest.raises(RuntimeError, match="edit failed"):
        generate_hooked(tiny, PROMPTS, [Splice("blocks.0.resid_post", boom)])
    assert _n_hooks(tiny) == before
    assert generate_hooked(tiny, PROMPTS, max_new_tokens=5) == plain


def test_min_new_tokens_and_sampling_seed(tiny):
    a = generate_hooked(tiny, PROMPTS, max_new_tokens=5, do_sample=True, seed=3)
    assert a == generate_hooked(tiny, PROMPTS, max_new_tokens=5, do_sample=True, seed=3)
    out = generate_hooked(tiny, ["The cat"], max_new_tokens=4, min_new_tokens=4)
    assert len(out) == 1
