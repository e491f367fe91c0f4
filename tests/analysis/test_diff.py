"""Model diff: decoder-norm classes, Latent Scaling against an independent least-squares fit, artifact flags,
top latents and their contexts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.analysis.diff import (
    classify,
    decoder_cosine,
    decoder_lens,
    diff_table,
    latent_contexts,
    latent_scaling,
    norm_diff,
    relative_norm,
    share_of_contexts,
    top_latents,
)
from toolkit.config import CrosscoderConfig
from toolkit.crosscoder import Crosscoder, PairedActivations
from toolkit.errors import FeatureIndexError
from toolkit.training.crosscoder_trainer import train_crosscoder

PAIR = ("base", "ft")


pytestmark = pytest.mark.usefixtures("one_thread")


def _handmade(decoders: torch.Tensor, encoders: torch.Tensor | None = None) -> Crosscoder:
    """A ReLU crosscoder with the given (d_sae, 2, d) decoder (and (2, d, d_sae) encoder), zero biases."""
    s, _, d = decoders.shape
    cc = Crosscoder(CrosscoderConfig(d_in=d, d_sae=s, architecture="relu", models=PAIR), seed=0)
    with torch.no_grad():
        cc.W_dec.copy_(decoders)
        if encoders is not None:
            cc.W_enc.copy_(encoders)
    return cc


def test_norm_ratios_and_classes() -> None:
    dec = torch.zeros(5, 2, 3)
    dec[0, 1, 0] = 2.0  # only in the fine-tune
    dec[1, 0, 1] = 1.0  # only in the base
    dec[2, :, 2] = 1.5  # equal in both
    dec[3, 0, 0], dec[3, 1, 0] = 1.0, 0.45  # mostly base
    dec[4, 0, 0], dec[4, 1, 0] = 0.9, 1.0  # shared, a bit stronger in the fine-tune
    cc = _handmade(dec)
    nd = norm_diff(cc)
    np.testing.assert_allclose(nd, [1.0, 0.0, 0.5, 0.225, 0.55], atol=1e-6)
    np.testing.assert_allclose(relative_norm(cc), [1.0, 0.0, 0.5, 0.45 / 1.45, 1 / 1.9], atol=1e-6)
    assert list(classify(nd)) == ["ft-only", "base-only", "shared", "other", "shared"]
    assert list(classify(nd, shared=0.01)) == ["ft-only", "base-only", "shared", "other", "other"]
    cos = decoder_cosine(cc)
    assert np.isnan(cos[:2]).all() and np.allclose(cos[2:], 1.0)


def test_a_changed_decoder_ranks_first_among_fine_tune_leaning_latents() -> None:
    dec = torch.zeros(3, 2, 3)
    dec[0, 0, 0], dec[0, 1, 0] = 1.0, 1.0  # unchanged
    dec[1, 0, 1], dec[1, 1] = 1.0, torch.tensor([0.0, 1.0, 1.0])  # the fine-tune writes something extra
    dec[2, 0, 2], dec[2, 1, 2] = 1.0, 1.1  # slightly longer, same direction
    table = diff_table(_handmade(dec))
    assert list(table.cls) == ["shared", "other", "shared"]
    assert table.cosine[1] == pytest.approx(2 ** -0.5)
    assert top_latents(table, 2, kind=None, by="norm_diff") == [1, 2]
    assert top_latents(table, 1, kind=None, by="cosine") == [1]
    assert top_latents(table, 5, kind="ft-only") == []


def test_classification_of_a_trained_crosscoder_on_a_planted_dictionary() -> None:
    g = torch.Generator().manual_seed(0)
    d = 16
    dirs = torch.randn(32, 2, d, generator=g)
    dirs[:, 1] = dirs[:, 0]
    dirs[24:28, 0] = 0  # fine-tune only
    dirs[28:32, 1] = 0  # base only
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    f = (torch.rand(4096, 32, generator=g) < 0.08).float() * (1 + torch.rand(4096, 32, generator=g))
    acts = PairedActivations(torch.einsum("nf,fmd->nmd", f, dirs) * 3, PAIR, "blocks.0.resid_post")
    cfg = CrosscoderConfig(d_in=d, d_sae=48, k=4, models=PAIR, site="blocks.0.resid_post")
    cc = train_crosscoder(cfg, acts, total_steps=500, batch_size=256, lr=1e-2, progress=False).crosscoder
    table = diff_table(cc, acts)

    def best(feature: int, model: int) -> int:
        return int(torch.nn.functional.cosine_similarity(cc.W_dec[:, model].detach(), dirs[feature, model][None],
                                                         dim=-1).argmax())

    assert [table.cls[best(i, 1)] for i in range(24, 28)] == ["ft-only"] * 4
    assert [table.cls[best(i, 0)] for i in range(28, 32)] == ["base-only"] * 4
    shared = [table.cls[best(i, 0)] for i in range(24)]
    assert shared.count("shared") >= 22, shared
    ft_top = top_latents(table, 10, min_freq=0.02)
    assert {best(i, 1) for i in range(24, 28)} <= set(ft_top)
    assert not table.artifact[[best(i, 1) for i in range(24, 28)]].any()  # genuinely fine-tune only


def _lstsq_beta(f: np.ndarray, d: np.ndarray, y: np.ndarray) -> float:
    a = (f[:, None] * d[None, :]).reshape(-1, 1)
    return float(np.linalg.lstsq(a, y.reshape(-1), rcond=None)[0][0])


def test_latent_scaling_matches_an_independent_least_squares_fit() -> None:
    g = torch.Generator().manual_seed(2)
    cc = Crosscoder(CrosscoderConfig(d_in=8, d_sae=12, architecture="relu", models=PAIR), seed=3)
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(12, 2, 1, generator=g) + 0.2)
        cc.b_enc.fill_(-0.2)
        cc.b_dec.normal_(generator=g)
        cc.input_scale.copy_(torch.tensor([0.5, 2.0]))
    x = torch.randn(600, 2, 8, generator=g)
    for specific in ("ft", "base"):
        ls = latent_scaling(cc, PairedActivations(x, PAIR), specific=specific, batch_size=128)
        with torch.no_grad():
            xn = (x * cc.input_scale[:, None]).double().numpy()
            f = cc.encode(x).double().numpy()
            W = cc.W_dec.double().numpy()
            recon = f @ W.reshape(12, 16)
            recon = recon.reshape(-1, 2, 8) + cc.b_dec.double().numpy()
        checked = 0
        for j in range(12):
            if (f[:, j] > 0).sum() < 5:
                continue
            d = W[j, 1 if specific == "ft" else 0]
            for m in range(2):
                eps = xn[:, m] - (recon[:, m] - f[:, j, None] * W[j, m][None])
                assert ls.beta_error[j, m] == pytest.approx(_lstsq_beta(f[:, j], d, eps), rel=1e-6, abs=1e-9)
                assert ls.beta_recon[j, m] == pytest.approx(_lstsq_beta(f[:, j], d, recon[:, m]), rel=1e-6, abs=1e-9)
            checked += 1
        assert checked >= 6
    assert np.isnan(latent_scaling(cc, PairedActivations(torch.zeros(4, 2, 8), PAIR)).beta_error).all()


def test_artifacts_complete_shrinkage_and_latent_decoupling_are_flagged() -> None:
    """Latent 0: ft-only decoder, but the base activations carry its direction (Complete Shrinkage).
    Latent 1: ft-only, but the base model has the concept through latent 2 (Latent Decoupling).
    Latent 3: really only in the fine-tune."""
    e = torch.eye(4)
    dec, enc = torch.zeros(4, 2, 4), torch.zeros(2, 4, 4)
    for j, (model, direction) in enumerate([(1, 0), (1, 1), (0, 1), (1, 3)]):
        dec[j, model] = e[direction]
        enc[model, :, j] = e[direction]
    cc = _handmade(dec, enc)
    g = torch.Generator().manual_seed(0)
    a, b, c = ((torch.rand(3000, generator=g) < 0.3) * (1 + torch.rand(3000, generator=g)) for _ in range(3))
    base = a[:, None] * e[0] + b[:, None] * e[1]
    ft = base + c[:, None] * e[3]
    table = diff_table(cc, PairedActivations(torch.stack([base, ft], 1), PAIR))
    assert list(table.cls) == ["ft-only", "ft-only", "base-only", "ft-only"]
    np.testing.assert_allclose(table.nu_error[[0, 1, 3]], [1.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(table.nu_recon[[0, 1, 3]], [0.0, 1.0, 0.0], atol=1e-9)
    assert list(table.artifact) == [True, True, False, False]
    assert top_latents(table, 5) == [3]
    assert top_latents(table, 5, exclude_artifacts=False, by="nu") == [3, 0, 1]
    assert table.row(3)["class"] == "ft-only" and table.counts()["artifact"] == 2
    with pytest.raises(FeatureIndexError, match="0..3"):
        table.row(4)


def test_decoder_lens_reads_what_fine_tuning_added(tiny) -> None:
    W_U = tiny.hf.get_output_embeddings().weight.detach()
    scale = 1 + tiny.hf.model.norm.weight.detach()
    target = 57  # any token: the fine-tune's decoder adds its unembedding direction
    base_dir = torch.randn(64)
    dec = torch.stack([base_dir, base_dir + 5 * W_U[target] / scale])[None]  # the fine-tune adds token "at"
    cc = Crosscoder(CrosscoderConfig(d_in=64, d_sae=1, architecture="relu"), seed=0)
    with torch.no_grad():
        cc.W_dec.copy_(dec)
    top = decoder_lens(cc, tiny, 0, which="diff", k=3)
    assert top[0][0] == tiny.tokenizer.decode([target])
    with pytest.raises(ValueError, match="which"):
        decoder_lens(cc, tiny, 0, which="chat")


def test_latent_contexts_highlight_the_top_tokens(tiny) -> None:
    tok = tiny.tokenizer
    ids = torch.tensor([tok("The cat sat on the mat. Paris is the capital of France.")["input_ids"]])
    n = ids.shape[1]
    e = torch.eye(4)
    cc = _handmade(torch.stack([torch.stack([e[0], e[0]])] + [torch.zeros(2, 4)] * 3),
                   torch.stack([e.T, torch.zeros(4, 4)]))
    strength = torch.arange(n, dtype=torch.float32)
    acts = torch.zeros(n, 2, 4)
    acts[:, 0, 0] = strength  # latent 0 grows along the text
    pair = PairedActivations(acts, PAIR, None, ids, torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1))
    ctx = latent_contexts(cc, pair, 0, tok, k=3, window=4)
    assert [c.position for c in ctx] == [n - 1, n - 2, n - 3]
    assert ctx[0].activation == pytest.approx(n - 1) and ctx[0].text.endswith(f"«{ctx[0].token}»")
    assert all("«" in c.text and "»" in c.text for c in ctx)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, n - 1] = True
    assert share_of_contexts(ctx, mask) == pytest.approx(1 / 3)
    with pytest.raises(FeatureIndexError):
        latent_contexts(cc, pair, 4, tok)
    with pytest.raises(ValueError, match="needs acts.tokens"):
        latent_contexts(cc, PairedActivations(acts, PAIR), 0, tok)
