import pytest
import torch

from toolkit.sites import SITE_KINDS, module_path
from toolkit.tracing import capture, iter_capture


def _hook_capture(model, batch, site):
    """Reference: the same activation read with a plain PyTorch hook on the HF module."""
    store = {}
    mod = model.hf.get_submodule(module_path(site))

    if site.io == "input":
        def hook(m, args, kwargs):
            store["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        h = mod.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(m, args, out):
            store["x"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        h = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.hf(**batch)
    finally:
        h.remove()
    return store["x"]


@pytest.mark.parametrize("kind", SITE_KINDS)
def test_every_site_kind_matches_plain_hook(tiny, kind):
    prompts = ["The cat sat on the mat", "Paris is"]
    site = tiny.site(f"blocks.1.{kind}")
    acts = capture(tiny, prompts, site)
    ref = _hook_capture(tiny, tiny.tokenize(prompts), site)
    assert acts[site].shape == (2, ref.shape[1], tiny.site_width(site))
    torch.testing.assert_close(acts[site], ref)


def test_resid_identities(tiny):
    a = capture(tiny, "The cat sat", ["blocks.0.resid_post", "blocks.1.resid_pre", "blocks.1.resid_mid",
                                      "blocks.1.attn_out", "blocks.1.mlp_out", "blocks.1.resid_post"])
    torch.testing.assert_close(a["blocks.0.resid_post"], a["blocks.1.resid_pre"])
    torch.testing.assert_close(a["blocks.1.resid_pre"] + a["blocks.1.attn_out"], a["blocks.1.resid_mid"])
    torch.testing.assert_close(a["blocks.1.resid_mid"] + a["blocks.1.mlp_out"], a["blocks.1.resid_post"])


def test_early_stop_never_runs_later_layers(tiny4):
    calls = {i: 0 for i in range(tiny4.n_layers)}
    # pre-hooks: a layer counts as run once it starts
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(tiny4.hf.model.layers)]
    norm_calls = []
    hooks.append(tiny4.hf.model.norm.register_forward_pre_hook(lambda *a: norm_calls.append(1)))
    try:
        capture(tiny4, ["The cat sat", "Paris"], ["blocks.1.resid_post", "blocks.0.mlp_out"])
        assert calls == {0: 1, 1: 1, 2: 0, 3: 0} and not norm_calls
        capture(tiny4, ["The cat sat"], "blocks.1.resid_post", stop_early=False)
        assert calls == {0: 2, 1: 2, 2: 1, 3: 1} and norm_calls
    finally:
        for h in hooks:
            h.remove()


def test_batching_does_not_change_results(tiny):
    prompts = ["The cat sat on the mat", "Paris is the capital", "hello", "Water boils"]
    a = capture(tiny, prompts, "blocks.1.resid_post", batch_size=4)
    b = capture(tiny, prompts, "blocks.1.resid_post", batch_size=1)
    mask = a.attention_mask.bool()
    torch.testing.assert_close(a["blocks.1.resid_post"][mask], b["blocks.1.resid_post"][mask], atol=1e-5, rtol=1e-5)


def test_tokens_only_drops_bos_and_pads(tiny):
    a = capture(tiny, ["The cat sat on the mat", "Paris"], "blocks.0.resid_post")
    rows = a.tokens_only("blocks.0.resid_post")
    assert rows.shape[0] == int(a.attention_mask.sum()) - 2


def test_iter_capture_streams_contexts(tiny):
    ctx = torch.randint(4, 300, (5, 12))
    ctx[:, 0] = tiny.bos_token_id
    seen = list(iter_capture(tiny, ctx, ["blocks.0.resid_post"], batch_size=2, progress=False))
    assert [i for i, _ in seen] == [0, 2, 4]
    full = torch.cat([d["blocks.0.resid_post"] for _, d in seen])
    ref = capture(tiny, ctx, "blocks.0.resid_post")["blocks.0.resid_post"]
    torch.testing.assert_close(full, ref)
    resumed = list(iter_capture(tiny, ctx, "blocks.0.resid_post", batch_size=2, start=2, progress=False))
    assert [i for i, _ in resumed] == [2, 4]
