"""Training HierarchicalTopK and AdaptiveK: their objectives against dense autograd, what each paper claims in
miniature (one HierarchicalTopK SAE beats a truncated TopK at small k; AdaptiveK's k tracks complexity), the
probe's closed-form fit, the text complexity proxy, argument checks and exact resume across the probe's phases."""

from __future__ import annotations

import pytest
import torch

from toolkit.config import SAEConfig, TrainConfig
from toolkit.errors import ArgumentError, CheckpointError
from toolkit.sae import SAE
from toolkit.training.budget_objectives import prefix_errors
from toolkit.training.checkpoint import latest_checkpoint, load_checkpoint
from toolkit.training.complexity import (
    ComplexityData,
    complexity_examples,
    fit_probe,
    rank_scores,
    text_complexity,
)
from toolkit.training.objectives import LossContext, get_objective
from toolkit.training.sae_trainer import train_sae

D, N_ATOMS, BATCH, K = 32, 96, 256, 8

pytestmark = pytest.mark.usefixtures("one_thread")


def atoms() -> torch.Tensor:
    w = torch.randn(N_ATOMS, D, generator=torch.Generator().manual_seed(0))
    return w / w.norm(dim=1, keepdim=True)


def batch(i: int, rows: int = BATCH) -> torch.Tensor:
    """Rows with a variable number (1..8) of active atoms; the count is what AdaptiveK should track. Atoms with
    a low index are more frequent, so a good SAE orders its budget by them."""
    g = torch.Generator().manual_seed(1000 + i)
    n_active = torch.randint(1, 9, (rows, 1), generator=g)
    freq = torch.linspace(1.0, 0.2, N_ATOMS)
    pick = (torch.rand(rows, N_ATOMS, generator=g) * freq).argsort(1, descending=True).argsort(1) < n_active
    codes = pick * (torch.rand(rows, N_ATOMS, generator=g) * 2 + 1)
    return codes @ atoms() * 2 + 0.3


def source(start: int):
    i = start
    while True:
        yield batch(i)
        i += 1


def counts(x: torch.Tensor) -> torch.Tensor:
    """How many atoms each row of batch() holds (recovered exactly from the construction)."""
    return ((x - 0.3) / 2 @ torch.linalg.pinv(atoms())).abs().gt(0.5).sum(1)


def complexity_data(n: int = 1024) -> ComplexityData:
    x = torch.cat([batch(50_000 + i) for i in range(n // BATCH)])
    return ComplexityData.from_raw(x, counts(x).double() + 0.01 * torch.rand(len(x)))


def config(arch: str, steps: int = 300, **kw) -> TrainConfig:
    extra = {"adaptivek": {"k_min": 1}}.get(arch, {})
    defaults = {"lr": 3e-3, "batch_size": BATCH, "total_steps": steps, "log_every": 20, "dead_after_tokens": 40 * BATCH}
    return TrainConfig(SAEConfig(D, 128, arch, k=K, **extra), **{**defaults, **kw})


def fvu(sae: SAE, x: torch.Tensor, k: int | None = None) -> float:
    with torch.no_grad():
        r = sae(x, k=k).reconstruction
    return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# ---------------------------------------------------------------- objectives


@pytest.mark.parametrize("dense_gram", [True, False])
def test_prefix_errors_equal_explicit_partial_sums(dense_gram):
    g = torch.Generator().manual_seed(0)
    r, v, W = torch.randn(5, 7, generator=g), torch.rand(5, 4, generator=g), torch.randn(11, 7, generator=g)
    idx = torch.rand(5, 11, generator=g).argsort(1)[:, :4]
    rows = W[idx]
    direct = torch.stack([(r - (v[:, :j, None] * rows[:, :j]).sum(1)).pow(2).sum(-1) for j in range(1, 5)], 1)
    torch.testing.assert_close(prefix_errors(r, v, idx, W, dense_gram=dense_gram), direct, rtol=1e-5, atol=1e-5)


def _dense_reference(sae: SAE, x: torch.Tensor, keep: torch.Tensor, dead: torch.Tensor):
    """Dense codes with the entries `keep` and the AuxK term, in plain autograd."""
    x_in = x - sae.b_dec
    acts = (x_in @ sae.W_enc + sae.b_enc).relu()
    codes = acts * keep
    recon = codes @ sae.W_dec + sae.b_dec
    resid = x - recon.detach()
    dead_pre = torch.where(dead, acts, torch.full_like(acts, -1.0))
    aux_keep = torch.zeros_like(acts).scatter(1, dead_pre.topk(16, dim=1).indices, 1.0)
    e_hat = ((x_in.detach() @ sae.W_enc + sae.b_enc).relu() * aux_keep) @ sae.W_dec
    aux = min(int(dead.sum()) / 16, 1.0) * (e_hat - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()
    return acts, codes, aux


@pytest.mark.parametrize("arch", ["hierarchical_topk", "adaptivek"])
def test_sparse_objectives_equal_dense_autograd(arch):
    cfg = config(arch, hierarchical_budgets=(1, 2, 5, 8) if arch == "hierarchical_topk" else None)
    sae = SAE.from_config(cfg.sae, seed=3).train()
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D) * 0.1)
        sae.b_enc.copy_(torch.randn(128) * 0.1)
        if arch == "adaptivek":
            sae.probe_weight.copy_(torch.randn(D) * 0.05)
    x = batch(0, rows=64)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True
    ctx = LossContext(0.01, None, 0.0, dead, 16, 1 / 32, cfg.hierarchical_budgets)
    out = get_objective(arch)(sae, x, ctx)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}

    ref = SAE.from_state_dict(cfg.sae, {k: v.detach().clone() for k, v in sae.state_dict().items()}).train()
    acts = (x - ref.b_dec) @ ref.W_enc + ref.b_enc
    rank = acts.argsort(1, descending=True).argsort(1)  # 0 = largest
    if arch == "hierarchical_topk":
        losses = []
        for j in cfg.hierarchical_budgets:
            _, codes, _ = _dense_reference(ref, x, (rank < j).float(), dead)
            losses.append((codes @ ref.W_dec + ref.b_dec - x).pow(2).sum(-1).mean())
        _, _, aux = _dense_reference(ref, x, (rank < K).float(), dead)
        loss = torch.stack(losses).mean() + aux / 32
    else:
        k = ref.budget(x)
        acts_, codes, aux = _dense_reference(ref, x, (rank < k[:, None]).float(), dead)
        mse = (codes @ ref.W_dec + ref.b_dec - x).pow(2).sum(-1).mean()
        loss = mse + 0.01 * D * codes.sum(-1).mean() / x.norm(dim=-1).mean() + aux / 32
        assert torch.equal((codes != 0).sum(1), k)
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-4)
    for n, p in ref.named_parameters():
        if p.grad is not None or n in ours:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert "probe_weight" not in ours  # k is rounded: the SAE loss sends no gradient to the probe


# ---------------------------------------------------------------- the papers' claims in miniature


def test_one_hierarchical_sae_beats_a_truncated_topk_at_small_k():
    hier = train_sae(config("hierarchical_topk"), source, progress=False).sae
    topk = train_sae(config("topk"), source, progress=False).sae
    x = torch.cat([batch(90_000 + i) for i in range(4)])
    for k in (1, 2, 4):
        assert fvu(hier, x, k) < 0.97 * fvu(topk, x, k), k  # measured here: 0.63 vs 0.67, 0.41 vs 0.44, 0.16 vs 0.17
    assert fvu(hier, x, K) < 1.5 * fvu(topk, x, K)  # and stays close at the full budget (0.044 vs 0.035)


def test_adaptivek_k_tracks_complexity_and_the_scale_folds_into_the_probe(tmp_path):
    data = complexity_data()
    res = train_sae(config("adaptivek", joint_fraction=0.2), source, complexity=data, out_dir=tmp_path, progress=False)
    sae = SAE.load(tmp_path / "sae")
    x = torch.cat([batch(90_000 + i) for i in range(4)])
    k, c = sae.budget(x).double(), counts(x).double()
    assert torch.corrcoef(torch.stack([k, c]))[0, 1] > 0.8
    assert 1 <= int(k.min()) < int(k.max()) <= K
    assert res.history[-1]["fvu"] < 0.5 * res.history[0]["fvu"]
    assert abs(res.history[-1]["l0"] - float(k.mean())) < 1.0


def test_probe_fit_recovers_a_linear_score_and_picks_lambda_by_cv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    w = torch.randn(20, generator=g) * 0.05
    y = (x @ w + 0.5).clamp(0, 1)
    fit = fit_probe(ComplexityData(x, y), (1e-3, 1e5), folds=4)
    assert fit.penalty == 1e-3 and fit.cv_rmse < 0.02
    torch.testing.assert_close(fit.weight, w, atol=5e-3, rtol=0)
    noise = fit_probe(ComplexityData(x, torch.rand(600, generator=g)), (1e-3, 1e5), folds=4)
    assert noise.penalty == 1e5  # pure noise: the heavier penalty generalizes better


# ---------------------------------------------------------------- the complexity proxy


class WordTokenizer:
    """Splits words into pieces of 3 letters: long words cost more pieces, as rare words do in a BPE vocabulary."""

    def __call__(self, texts, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [[0] * sum(-(-len(w) // 3) for w in t.split()) for t in texts]}


def test_text_complexity_rises_with_sentence_length_and_word_length():
    tok = WordTokenizer()
    short = "The cat sat. The dog ran. A man ate."
    long_sentence = "The cat sat on the mat and the dog ran to the man who ate a big red hat today"
    long_words = "Extraordinarily complicated constitutional jurisprudence necessitates deliberation."
    s = text_complexity([short, long_sentence, long_words, "1234 ..."], tok)
    assert s[0] < s[1] and s[0] < s[2] and s[3] == 0
    assert torch.equal(rank_scores(torch.tensor([3.0, 1.0, 2.0])), torch.tensor([5 / 6, 1 / 6, 0.5], dtype=torch.float64))


def test_complexity_examples_from_a_cache(tmp_path, tiny):
    from toolkit.tracing import fill_cache

    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(5, 60, (8, 17), generator=g)
    contexts[:, 0] = tiny.bos_token_id
    cache = fill_cache(tiny, "blocks.1.resid_post", contexts, tmp_path / "cache", batch_size=8, progress=False)
    seen = []

    def scorer(texts, tokenizer):
        seen.extend(texts)
        return torch.tensor([float(len(t)) for t in texts])

    data, raw = complexity_examples(cache, contexts, tiny.tokenizer, every=8, scorer=scorer)
    assert len(data) == 8 * 2 and data.activations.shape == (16, 64)  # positions 8 and 16 of each context
    assert float(data.scores.min()) > 0 and float(data.scores.max()) < 1
    assert seen[0] == tiny.tokenizer.decode(contexts[0, 1:9].tolist()) or seen[0] in {
        tiny.tokenizer.decode(contexts[c, 1:p].tolist()) for c in range(8) for p in (9, 17)}
    assert torch.equal(raw, torch.tensor([float(len(t)) for t in seen], dtype=torch.float64))


# ---------------------------------------------------------------- arguments and resume


def test_arguments_are_checked():
    with pytest.raises(ArgumentError, match="needs complexity="):
        train_sae(config("adaptivek"), source, progress=False)
    with pytest.raises(ArgumentError, match="17 wide"):
        train_sae(config("adaptivek"), source, complexity=ComplexityData(torch.randn(8, 17), torch.rand(8)),
                  progress=False)
    with pytest.raises(ArgumentError, match=r"\[0, 1\]"):
        ComplexityData(torch.randn(8, D), torch.randn(8) + 5)
    with pytest.raises(ValueError, match="hierarchical_budgets must be increasing"):
        config("hierarchical_topk", hierarchical_budgets=(2, 1))
    with pytest.raises(ValueError, match="hierarchical_budgets must be increasing"):
        config("hierarchical_topk", hierarchical_budgets=(1, K + 1))
    with pytest.raises(ValueError, match="is for 'hierarchical_topk'"):
        config("topk", hierarchical_budgets=(1, 2))


class Killed(Exception):
    pass


def kill_at(step: int):
    def callback(s: int, metrics: dict) -> None:
        if s == step:
            raise Killed
    return callback


@pytest.mark.parametrize("arch", ["hierarchical_topk", "adaptivek"])
def test_resume_is_exact(tmp_path, arch):
    # adaptivek: the joint phase starts at step 60; the resumed run restarts inside it (checkpoint at step 80)
    cfg = config(arch, steps=120, checkpoint_every=40, joint_fraction=0.5)
    data = complexity_data(512) if arch == "adaptivek" else None
    full = train_sae(cfg, source, out_dir=tmp_path / "full", progress=False, complexity=data)
    with pytest.raises(Killed):
        train_sae(cfg, source, out_dir=tmp_path / "cut", progress=False, complexity=data, callback=kill_at(95))
    resumed = train_sae(cfg, source, out_dir=tmp_path / "cut", resume=True, progress=False, complexity=data)
    for name, value in full.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name
    assert resumed.history == full.history
    if arch == "adaptivek":
        t = load_checkpoint(latest_checkpoint(tmp_path / "full")).tensors
        moved = (t["sae.probe_weight"] - t["train.probe_w0"]).norm() / t["train.probe_w0"].norm()
        assert 0 < float(moved) < 0.5  # the joint phase trains the probe, near its closed-form start
        other = complexity_data(256)
        with pytest.raises(CheckpointError, match="other complexity examples"):
            train_sae(cfg, source, out_dir=tmp_path / "cut", resume=True, progress=False, complexity=other)
