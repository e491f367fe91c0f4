import pytest
import torch

from toolkit.errors import NonFiniteError, ShapeMismatchError
from toolkit.tracing import Ablate, Add, Replace, Splice, capture, generate, run_with_edits


def test_no_edit_equals_plain_forward(tiny):
    b = tiny.tokenize("The cat sat on the mat")
    logits, _ = run_with_edits(tiny, b)
    with torch.no_grad():
        ref = tiny.hf(**b).logits
    torch.testing.assert_close(logits, ref)
    assert logits.abs().max() <= tiny.hf.config.final_logit_softcapping  # soft-capped logits, not lm_head output


def test_add_changes_output_and_downstream(tiny):
    v = torch.randn(64)
    base, c0 = run_with_edits(tiny, "The cat sat", capture=["blocks.0.resid_post"])
    out, c1 = run_with_edits(tiny, "The cat sat", [Add("blocks.0.resid_post", v, scale=3.0)], capture=["blocks.0.resid_post"])
    torch.testing.assert_close(c1["blocks.0.resid_post"], c0["blocks.0.resid_post"] + 3.0 * v)
    assert (out - base).abs().max() > 1e-3


def test_positions_limit_the_edit(tiny):
    v = torch.randn(64)
    _, c0 = run_with_edits(tiny, "The cat sat", capture=["blocks.0.resid_post"])
    _, c1 = run_with_edits(tiny, "The cat sat", [Add("blocks.0.resid_post", v, positions=[-1])],
                           capture=["blocks.0.resid_post"])
    d = (c1["blocks.0.resid_post"] - c0["blocks.0.resid_post"])[0]
    assert d[:-1].abs().max() == 0 and torch.allclose(d[-1], v)


def test_replace_ablate_splice(tiny):
    p = "The cat sat on the mat"
    base, _ = run_with_edits(tiny, p)
    r = torch.randn(64)
    _, c = run_with_edits(tiny, p, [Replace("blocks.1.resid_pre", r)], capture=["blocks.1.resid_pre"])
    assert torch.allclose(c["blocks.1.resid_pre"], r.expand_as(c["blocks.1.resid_pre"]))
    abl, c = run_with_edits(tiny, p, [Ablate("blocks.1.mlp_out")], capture=["blocks.1.mlp_out"])
    assert c["blocks.1.mlp_out"].abs().max() == 0 and (abl - base).abs().max() > 1e-4
    mean = capture(tiny, ["hello world", "Paris is"], "blocks.1.mlp_out").tokens_only("blocks.1.mlp_out").mean(0)
    _, c = run_with_edits(tiny, p, [Ablate("blocks.1.mlp_out", mean=mean)], capture=["blocks.1.mlp_out"])
    assert torch.allclose(c["blocks.1.mlp_out"][0, 3], mean)
    ident, _ = run_with_edits(tiny, p, [Splice("blocks.0.mlp_post", lambda x: x)])
    torch.testing.assert_close(ident, base)
    half, _ = run_with_edits(tiny, p, [Splice("blocks.0.mlp_post", lambda x: 0.5 * x)])
    assert (half - base).abs().max() > 1e-4


def test_edits_compose_in_order(tiny):
    v = torch.ones(64)
    _, c = run_with_edits(tiny, "The cat", [Add("blocks.0.resid_post", v), Splice("blocks.0.resid_post", lambda x: 2 * x)],
                          capture=["blocks.0.resid_post"])
    _, c0 = run_with_edits(tiny, "The cat", capture=["blocks.0.resid_post"])
    torch.testing.assert_close(c["blocks.0.resid_post"], 2 * (c0["blocks.0.resid_post"] + 1))


def test_bad_vectors_rejected_before_running(tiny):
    with pytest.raises(ShapeMismatchError, match="width 32 but site blocks.0.resid_post .* has width 64"):
        run_with_edits(tiny, "The cat", [Add("blocks.0.resid_post", torch.ones(32))])
    with pytest.raises(NonFiniteError, match="1 NaN"):
        run_with_edits(tiny, "The cat", [Add("blocks.0.resid_post", torch.tensor([float("nan")] + [0.0] * 63))])
    with pytest.raises(ShapeMismatchError, match="spliced function returned"):
        run_with_edits(tiny, "The cat", [Splice("blocks.0.resid_post", lambda x: x[..., :3])])


def test_generation_is_steered(tiny):
    prompts = ["The cat", "Paris is the"]
    plain = generate(tiny, prompts, max_new_tokens=6)
    assert plain == generate(tiny, prompts, max_new_tokens=6)  # greedy is deterministic
    with torch.no_grad():
        ids = tiny.tokenize(prompts[:1])
        ref = tiny.hf.generate(**ids, max_new_tokens=6, do_sample=False)
    assert plain[0] == tiny.tokenizer.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    steer = torch.randn(64) * 20
    steered = generate(tiny, prompts, [Add("blocks.0.resid_post", steer)], max_new_tokens=6)
    assert steered != plain
    again = generate(tiny, prompts, [Add("blocks.0.resid_post", steer)], max_new_tokens=6)
    assert again == steered


def test_generation_edit_applies_to_every_step(tiny):
    seen = []

    def spy(x):
        seen.append(x.shape[1])
        return x

    generate(tiny, "The cat", [Splice("blocks.1.resid_post", spy)], max_new_tokens=4)
    assert len(seen) == 4 and seen[0] > 1 and seen[1:] == [1, 1, 1]


def test_skip_bos_leaves_bos_alone_with_left_padding(tiny):
    prompts = ["The cat sat on the mat", "Paris"]
    batch = tiny.tokenize(prompts, padding_side="left")
    _, c0 = run_with_edits(tiny, batch, capture=["blocks.0.resid_post"])
    _, c1 = run_with_edits(tiny, batch, [Splice("blocks.0.resid_post", lambda x: x + 1, skip_bos=True)],
                           capture=["blocks.0.resid_post"])
    bos = batch["input_ids"] == tiny.bos_token_id
    assert bos[1].nonzero().item() > 0  # the short prompt's BOS is not at position 0
    d = c1["blocks.0.resid_post"] - c0["blocks.0.resid_post"]
    assert d[bos].abs().max() == 0 and torch.allclose(d[~bos], torch.ones_like(d[~bos]))


def test_logits_to_keep_returns_the_last_positions_only(tiny):
    prompts = ["The cat sat on the mat", "Paris is"]
    v = torch.randn(tiny.d_model)
    with torch.no_grad():
        full, _ = run_with_edits(tiny, prompts, [Add("blocks.0.resid_post", v)])
        last, saved = run_with_edits(tiny, prompts, [Add("blocks.0.resid_post", v)], capture=["blocks.1.resid_post"],
                                     logits_to_keep=2)
    assert last.shape == (2, 2, full.shape[-1])
    torch.testing.assert_close(last, full[:, -2:], atol=1e-5, rtol=1e-5)  # other matmul shapes: rounding only
    assert saved["blocks.1.resid_post"].shape[1] == full.shape[1]  # activations still cover every position
    with pytest.raises(ValueError, match="logits_to_keep"):
        run_with_edits(tiny, prompts, logits_to_keep=0)
