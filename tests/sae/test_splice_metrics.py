import pytest
import torch

from toolkit.config import SAEConfig
from toolkit.errors import ShapeMismatchError
from toolkit.sae.metrics import SAEMetrics, evaluate_sae, reconstruction_metrics
from toolkit.sae.sae import SAE
from toolkit.sae.splice import SpliceRecord, generate_with_sae, run_with_sae, sae_splice
from toolkit.tracing import Replace, capture, run_with_edits

SITE = "blocks.0.resid_post"


def _sae(d_in=64, d_sae=256, k=8, seed=0, site=SITE):
    return SAE.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, site=site), seed=seed)


def _identity_sae(d_in=64, site=SITE):
    """relu(x) - relu(-x) = x: a ReLU SAE with d_sae = 2 d_in that reconstructs perfectly."""
    sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=2 * d_in, architecture="relu", site=site,
                                    apply_b_dec_to_input=False))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_splice_replaces_with_reconstruction(tiny):
    sae = _sae()
    p = "The cat sat on the mat"
    x = capture(tiny, p, SITE)[SITE]
    recon = sae(x).reconstruction
    spliced = run_with_sae(tiny, p, sae)
    manual, _ = run_with_edits(tiny, p, [Replace(SITE, torch.zeros(64)), ])
    assert (spliced - manual).abs().max() > 0  # sanity: not the trivial replacement
    ref, _ = run_with_edits(tiny, p, [sae_splice(sae, tiny)], capture=[SITE])
    torch.testing.assert_close(ref, spliced)
    _, c = run_with_edits(tiny, p, [sae_splice(sae, tiny)], capture=[SITE])
    torch.testing.assert_close(c[SITE][:, 1:], recon[:, 1:])
    torch.testing.assert_close(c[SITE][:, 0], x[:, 0])  # BOS keeps the model's own activation
    _, c = run_with_edits(tiny, p, [sae_splice(sae, tiny, skip_bos=False)], capture=[SITE])
    torch.testing.assert_close(c[SITE], recon)


def test_keep_error_leaves_downstream_unchanged_and_costs_one_pass(tiny, monkeypatch):
    sae = _sae()
    calls = []
    orig = SAE.forward
    monkeypatch.setattr(SAE, "forward", lambda self, x: calls.append(1) or orig(self, x))
    clean, _ = run_with_edits(tiny, "The cat sat")
    kept = run_with_sae(tiny, "The cat sat", sae, keep_error=True)
    torch.testing.assert_close(kept, clean)
    assert len(calls) == 1


def test_edit_codes_with_error_term(tiny):
    sae = _sae()
    p = "Paris is the capital of France"
    x = capture(tiny, p, SITE)[SITE]
    codes = sae.encode(x)
    j = int(codes[0, 3].nonzero()[0])

    def drop(c):
        c = c.clone()
        c[..., j] = 0
        return c

    _, got = run_with_edits(tiny, p, [sae_splice(sae, tiny, keep_error=True, edit_codes=drop)], capture=[SITE])
    want = x - codes[..., j:j + 1] * sae.W_dec[j]
    torch.testing.assert_close(got[SITE][:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[SITE][:, 0], x[:, 0])


def test_width_mismatch_before_running(tiny):
    sae = _sae(d_in=32)
    calls = []
    h = tiny.hf.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ShapeMismatchError, match=r"reads 32-wide activations, but site blocks.0.resid_post .* is 64 wide"):
            run_with_sae(tiny, "The cat", sae)
    finally:
        h.remove()
    assert calls == []


def test_generate_with_sae_keep_error_matches_plain(tiny):
    from toolkit.tracing import generate

    sae = _sae()
    assert generate_with_sae(tiny, "The cat", sae, max_new_tokens=5) == generate(tiny, "The cat", max_new_tokens=5)


def _contexts(tiny, n=4, ctx=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tiny.tokenizer), (n, ctx), generator=g)
    ids[:, 0] = tiny.bos_token_id
    return ids


def test_perfect_sae_has_zero_loss_metrics(tiny):
    m = evaluate_sae(_identity_sae(), tiny, _contexts(tiny), progress=False)
    assert m.n_tokens == 4 * 15
    assert m.fvu < 1e-10 and m.cosine > 0.9999
    assert abs(m.delta_lm_loss) < 1e-5 and m.kl < 1e-6
    assert m.ce_zero_ablated != m.ce_clean and m.ce_recovered == pytest.approx(1.0, abs=1e-4)  # random model: either side
    assert m.l0 <= 64


def test_random_sae_metrics_are_consistent(tiny):
    sae = _sae()
    ctx = _contexts(tiny)
    m = evaluate_sae(sae, tiny, ctx, progress=False)
    assert isinstance(m, SAEMetrics)
    assert m.l0 == pytest.approx(8.0)  # topk: exactly k per token
    assert m.fvu > 0.05 and m.kl > 0 and m.delta_lm_loss == pytest.approx(m.ce_spliced - m.ce_clean)
    # the same reconstruction metrics from captured activations (BOS dropped) without the model
    acts = capture(tiny, ctx, SITE)[SITE][:, 1:].reshape(-1, 64)
    r = reconstruction_metrics(sae, acts)
    assert r.fvu == pytest.approx(m.fvu, rel=1e-5) and r.l0 == pytest.approx(m.l0)
    assert "FVU" in str(m) and "<table>" in m._repr_html_()


def test_record_collects_what_the_splice_saw(tiny):
    rec = SpliceRecord()
    sae = _sae()
    run_with_sae(tiny, ["The cat sat", "hello"], sae, record=rec)
    assert rec.x[0].shape[:2] == rec.codes[0].shape[:2] == (2, tiny.tokenize(["The cat sat", "hello"])["input_ids"].shape[1])


@pytest.mark.parametrize("chunk", [1, 3, 16, 100])
def test_chunked_losses_equal_whole_tensor_formulas(monkeypatch, chunk):
    from toolkit.sae import metrics

    monkeypatch.setattr(metrics, "LOSS_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 13, 50, generator=g), torch.randn(3, 13, 50, generator=g)
    ids = torch.randint(0, 50, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding is left out of the cross-entropies (the KL keeps every position, as before)
    lp_a, lp_b = a[:, 1:-1].log_softmax(-1), b[:, 1:-1].log_softmax(-1)
    keep = mask[:, 2:].bool()
    ce_a = -lp_a.gather(-1, ids[:, 2:, None])[..., 0][keep]
    ce_b = -lp_b.gather(-1, ids[:, 2:, None])[..., 0][keep]
    kl = (lp_a.exp() * (lp_a - lp_b)).sum(-1).flatten()
    got = metrics._token_losses(a, ids, mask, b)
    for x, y in zip(got, (ce_a, ce_b, kl), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    (only,) = metrics._token_losses(a, ids, mask)
    torch.testing.assert_close(only, ce_a, atol=1e-6, rtol=1e-6)
