"""SAE trainer: every architecture learns a known sparse dictionary, normalization folds exactly into the saved
SAE, schedules, config checks, dead latents, and a run fed from an activation cache of tiny_gemma2."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from toolkit.config import SAEConfig, TrainConfig
from toolkit.errors import ShapeMismatchError
from toolkit.sae import SAE
from toolkit.training.checkpoint import latest_checkpoint, load_checkpoint
from toolkit.training.sae_trainer import geometric_median, lr_at, train_sae

D, N_TRUE, ACTIVE, BATCH = 32, 64, 4, 256


pytestmark = pytest.mark.usefixtures("one_thread")


def dictionary(d: int = D, n: int = N_TRUE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    return w / w.norm(dim=1, keepdim=True)


def sparse_batch(i: int, *, d: int = D, n: int = N_TRUE, active: int = ACTIVE, rows: int = BATCH,
                 offset: float = 1.0, scale: float = 3.0) -> torch.Tensor:
    """Batch i of activations made of `active` random atoms of a fixed dictionary (deterministic in i)."""
    g = torch.Generator().manual_seed(10_000 + i)
    idx = torch.rand(rows, n, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(rows, n).scatter(1, idx, torch.rand(rows, active, generator=g) * 2 + 0.5)
    return scale * (codes @ dictionary(d, n)) + 0.01 * torch.randn(rows, d, generator=g) + offset


def synthetic(start: int, **kw):
    """A `source(start_batch)` of sparse_batch(start), sparse_batch(start + 1), ..."""
    i = start
    while True:
        yield sparse_batch(i, **kw)
        i += 1


def config(arch: str, steps: int = 300, **kw) -> TrainConfig:
    extra = {"topk": {"k": ACTIVE}, "batchtopk": {"k": ACTIVE},
             "matryoshka": {"k": ACTIVE, "matryoshka_groups": (16, 48, 128)}}.get(arch, {})
    sae_kw = kw.pop("sae_kw", {})
    defaults = {"lr": 3e-3, "batch_size": BATCH, "total_steps": steps, "log_every": 50, "dead_after_tokens": 50 * BATCH}
    if arch == "jumprelu":
        defaults.update(target_l0=float(ACTIVE), l0_coefficient=0.1, sparsity_warmup_steps=min(50, steps // 2), threshold_lr_scale=10.0,
                        bandwidth=0.05)
    if arch == "relu":
        defaults.update(l1_coefficient=1.0, sparsity_warmup_steps=min(50, steps // 2))
    return TrainConfig(SAEConfig(D, 128, arch, **extra, **sae_kw), **{**defaults, **kw})


def heldout(n: int = 1024) -> torch.Tensor:
    return torch.cat([sparse_batch(100_000 + i) for i in range(n // BATCH)])


def fvu(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        r = sae(x).reconstruction
    return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu"])
def test_every_architecture_recovers_a_sparse_dictionary(arch):
    cfg = config(arch)
    res = train_sae(cfg, synthetic, progress=False)
    h = res.history
    assert res.steps == 300 and res.tokens == 300 * BATCH and res.skipped_steps == 0
    assert [e["step"] for e in h] == [50, 100, 150, 200, 250, 300]
    assert h[-1]["loss"] < h[0]["loss"] and h[-1]["mse"] < 0.6 * h[0]["mse"], h
    assert h[-1]["fvu"] < 0.2, h[-1]
    # the saved SAE reads raw activations: held-out FVU and L0 of plain inference
    x = heldout()
    assert not res.sae.training
    with torch.no_grad():
        l0 = float((res.sae.encode(x) != 0).sum(-1).float().mean())
    assert fvu(res.sae, x) < 0.25
    if arch == "topk":
        assert l0 <= ACTIVE and h[-1]["l0"] == pytest.approx(ACTIVE, abs=0.05)
    elif arch in ("batchtopk", "matryoshka"):
        assert h[-1]["l0"] == pytest.approx(ACTIVE, rel=0.02)
        assert float(res.sae.threshold) > 0 and h[-1]["threshold"] > 0
        assert l0 == pytest.approx(ACTIVE, rel=0.2)  # inference with the estimated threshold, no batch coupling
    elif arch == "jumprelu":
        assert h[-1]["l0"] == pytest.approx(ACTIVE, rel=0.3), h
        assert l0 == pytest.approx(ACTIVE, rel=0.4)
    else:
        assert l0 < 30, l0


def test_matryoshka_prefixes_reconstruct_on_their_own():
    res = train_sae(config("matryoshka"), synthetic, progress=False)
    x = heldout()
    with torch.no_grad():
        codes = res.sae.encode(x)
        errs = [float((x - res.sae.decode(codes, width=w)).pow(2).sum()) for w in (16, 48, 128)]
    total = float((x - x.mean(0)).pow(2).sum())
    assert errs[0] / total < 0.9 and errs[0] > errs[1] > errs[2]


def test_normalization_is_folded_into_the_saved_sae(tmp_path):
    for arch in ("jumprelu", "batchtopk", "relu"):
        out = tmp_path / arch
        res = train_sae(config(arch, steps=60), lambda s: synthetic(s, scale=40.0, offset=5.0), out_dir=out,
                        progress=False)
        # the scale makes E||x|| = sqrt(d_in) on the first batches
        first = torch.cat([sparse_batch(i, scale=40.0, offset=5.0) for i in range(8)])
        assert float((first * res.scale).norm(dim=1).mean()) == pytest.approx(math.sqrt(D), rel=1e-4)
        # the final checkpoint holds the SAE in training (normalized) units
        ck = load_checkpoint(latest_checkpoint(out))
        trained = SAE.from_state_dict(res.sae.cfg, {k[4:]: v for k, v in ck.tensors.items() if k.startswith("sae.")})
        if arch == "batchtopk":
            assert float(trained.threshold) > 0
        x = torch.cat([sparse_batch(100_000 + i, scale=40.0, offset=5.0) for i in range(4)])  # raw activations
        with torch.no_grad():
            raw = res.sae(x)
            norm = trained(x * res.scale)
        torch.testing.assert_close(raw.reconstruction, norm.reconstruction / res.scale, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(raw.codes, norm.codes / res.scale, rtol=1e-4, atol=1e-5)
        assert (raw.codes != 0).equal(norm.codes != 0)
        # the folder written by SAE.save is the same SAE
        loaded = SAE.load(out / "sae")
        for k, v in res.sae.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_decoder_rows_stay_unit_norm_except_for_relu():
    for arch in ("topk", "relu"):
        res = train_sae(config(arch, steps=40), synthetic, progress=False)
        norms = res.sae.W_dec.norm(dim=1)
        if arch == "relu":  # Anthropic's decoder-norm-weighted L1: the decoder is free (initialized at 0.1)
            assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
        else:
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    cfg = config("topk", steps=40, unit_norm_decoder=False)
    assert not cfg.decoder_unit_norm


def test_lr_schedule_warmup_and_decay():
    cfg = config("topk", steps=100, warmup_steps=10, decay="linear", decay_start=0.8)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(3e-4) and lrs[9] == pytest.approx(3e-3)
    assert all(v == pytest.approx(3e-3) for v in lrs[10:80])
    assert lrs[80] == pytest.approx(3e-3) and lrs[99] == pytest.approx(3e-3 * 0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:], strict=False))
    cos = config("topk", steps=100, decay="cosine", decay_start=0.5, min_lr_ratio=0.1)
    assert lr_at(cos, 75) == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(config("topk", decay="none"), 299) == 3e-3


def test_geometric_median_ignores_outliers():
    x = torch.cat([torch.randn(200, 3) * 0.1 + torch.tensor([1.0, 2.0, 3.0]), torch.full((20, 3), 1000.0)])
    torch.testing.assert_close(geometric_median(x).float(), torch.tensor([1.0, 2.0, 3.0]), atol=0.05, rtol=0)
    assert float((x.mean(0) - torch.tensor([1.0, 2.0, 3.0])).norm()) > 50


def test_dead_latents_are_tracked_and_auxk_uses_them():
    # 512 latents for 64 atoms: most latents go dead after 5 batches without firing
    cfg = config("topk", steps=40, dead_after_tokens=5 * BATCH, log_every=2)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "sae": {**cfg.sae.to_dict(), "d_sae": 512}})
    res = train_sae(cfg, synthetic, progress=False)
    dead = [e["dead_fraction"] for e in res.history]
    assert dead[0] == dead[1] == 0  # nothing can be dead before 5 batches have passed
    assert max(dead) > 0.01
    assert all(e["aux"] == 0 for e in res.history[:2]) and any(e["aux"] > 0 for e in res.history)
    off = train_sae(TrainConfig.from_dict({**cfg.to_dict(), "aux_k_coefficient": 0.0}), synthetic, progress=False)
    assert all(e["aux"] == 0 for e in off.history)


def test_config_checks():
    sae = SAEConfig(D, 128, "topk", k=4)
    with pytest.raises(ValueError, match="unknown TrainConfig key.*'lrr'"):
        TrainConfig.from_dict({"sae": sae.to_dict(), "lrr": 1e-3, "total_steps": 10})
    with pytest.raises(ValueError, match="exactly one of total_steps and total_tokens"):
        TrainConfig(sae, total_steps=10, total_tokens=10_000)
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(sae)
    with pytest.raises(ValueError, match="target_l0 .*'topk' sets its L0 with sae.k=4"):
        TrainConfig(sae, total_steps=10, target_l0=10.0)
    with pytest.raises(ValueError, match="aux_k is for top-k"):
        TrainConfig(SAEConfig(D, 128, "relu"), total_steps=10, aux_k=8)
    with pytest.raises(ValueError, match="warmup_steps=20 is longer than the run"):
        TrainConfig(sae, total_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 2"):
        TrainConfig(sae, total_steps=10, keep_checkpoints=1)
    with pytest.raises(ValueError, match="threshold_control_rate moves JumpReLU thresholds"):
        TrainConfig(sae, total_steps=10, threshold_control_rate=0.05)
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainConfig(sae, total_steps=10, max_grad_norm=0)
    with pytest.raises(ValueError, match="float32 or float64"):
        TrainConfig(SAEConfig(D, 128, "topk", k=4, dtype="bfloat16"), total_steps=10)
    cfg = TrainConfig(sae, total_tokens=10_000, batch_size=1000, adam_betas=[0.0, 0.999])
    assert cfg.n_steps == 10 and cfg.adam_betas == (0.0, 0.999)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.jumprelu_bandwidth == pytest.approx(0.001 * math.sqrt(D))


def test_iterable_sources_and_bad_batches():
    batches = [sparse_batch(i) for i in range(12)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = train_sae(config("topk", steps=20, log_every=5), batches, progress=False)
    assert res.steps == 12 and any("ran out after 12 batches" in str(x.message) for x in w)
    with pytest.raises(ShapeMismatchError, match=r"\(batch, 32\)"):
        train_sae(config("topk", steps=5), [torch.randn(8, 31)] * 10, progress=False)


def test_progress_bar_runs(capsys):
    res = train_sae(config("topk", steps=20, log_every=10), synthetic, progress=True)
    assert res.steps == 20
    err = capsys.readouterr().err
    assert "train topk" in err and "L0=" in err and "FVU=" in err


def test_cache_fed_run(tmp_path, tiny):
    from toolkit.tracing import fill_cache

    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(5, 60, (48, 16), generator=g)
    contexts[:, 0] = tiny.bos_token_id
    cache = fill_cache(tiny, "blocks.1.resid_post", contexts, tmp_path / "cache", batch_size=16, shard_contexts=16,
                       progress=False)
    assert cache.n_tokens == 48 * 15
    cfg = TrainConfig(SAEConfig(64, 128, "topk", k=8, site="blocks.1.resid_post", model=tiny.name), lr=3e-3,
                      batch_size=128, total_steps=40, log_every=10)
    res = train_sae(cfg, tmp_path / "cache", out_dir=tmp_path / "run", progress=False)
    assert res.steps == 40  # 5 batches an epoch: 8 epochs, reshuffled each time
    assert res.history[-1]["fvu"] < res.history[0]["fvu"]
    x = cache.shard(0)["blocks.1.resid_post"].float()
    assert fvu(res.sae, x) < 0.8
    assert SAE.load(tmp_path / "run" / "sae").cfg.site == "blocks.1.resid_post"
    wrong = TrainConfig(SAEConfig(32, 64, "topk", k=4), total_steps=2, batch_size=16)
    with pytest.raises(ShapeMismatchError, match="64-wide activations.*d_in=32"):
        train_sae(wrong, cache, progress=False)


def test_trains_with_gradients_turned_off_globally():
    torch.set_grad_enabled(False)  # as notebooks often do
    try:
        res = train_sae(config("topk", steps=20, log_every=10), synthetic, progress=False)
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    assert res.steps == 20 and res.history[-1]["mse"] < res.history[0]["mse"]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_gradients_equal_dense_autograd(arch):
    """The top-k family's sparse encoder backward and sparse decode give the gradients of the dense formula."""
    from toolkit.training.objectives import LossContext, get_objective

    cfg = config(arch).sae
    sae = SAE.from_config(cfg, seed=3).train()
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D) * 0.1)
        sae.b_enc.copy_(torch.randn(cfg.d_sae) * 0.1)
    x = sparse_batch(0, rows=64)
    dead = torch.zeros(cfg.d_sae, dtype=torch.bool)
    dead[::3] = True
    ctx = LossContext(0.0, None, 0.01, dead, 16, 1 / 32)
    out = get_objective(arch)(sae, x, ctx)
    out.loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}

    ref = SAE.from_state_dict(cfg, {k: v.detach().clone() for k, v in sae.state_dict().items()}).train()
    x_in = x - ref.b_dec
    pre = x_in @ ref.W_enc + ref.b_enc
    acts = pre.relu()
    if arch == "topk":
        keep = torch.zeros_like(acts).scatter(1, acts.topk(cfg.k, dim=1).indices, 1.0)
    else:
        keep = torch.zeros(acts.numel()).scatter(0, acts.flatten().topk(cfg.k * 64).indices, 1.0).view_as(acts)
    codes = acts * keep
    widths = cfg.matryoshka_groups if arch == "matryoshka" else (cfg.d_sae,)
    loss = sum(((codes[:, :w] @ ref.W_dec[:w] + ref.b_dec) - x).pow(2).sum(-1).mean() for w in widths)
    recon = codes @ ref.W_dec + ref.b_dec
    resid = x - recon.detach()
    dead_pre = torch.where(dead, acts, torch.full_like(acts, -1.0))
    aux_codes = torch.zeros_like(acts).scatter(1, dead_pre.topk(16, dim=1).indices, 1.0) * acts
    e_hat = (x_in.detach() @ ref.W_enc + ref.b_enc).relu() * (aux_codes != 0) @ ref.W_dec
    aux = min(int(dead.sum()) / 16, 1.0) * (e_hat - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()
    (loss + aux / 32).backward()
    torch.testing.assert_close(out.loss.detach(), (loss + aux / 32).detach(), rtol=1e-5, atol=1e-5)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("max_norm", [0.5, None])
def test_gradients_reach_adam_clipped_to_max_grad_norm(max_norm, monkeypatch):
    seen = []
    step = torch.optim.Adam.step

    def spy(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    train_sae(config("batchtopk", steps=5, max_grad_norm=max_norm), synthetic, progress=False)
    assert len(seen) == 5
    if max_norm is None:
        assert max(seen) > 0.5  # the raw norms are larger, so the clipped run below is really clipped
    else:
        assert max(seen) <= max_norm * (1 + 1e-5)


def test_jumprelu_sparse_gradients_equal_the_papers_dense_estimators():
    """The JumpReLU objective's sparse path gives the gradients of the dense "Jumping Ahead" formulas."""
    from toolkit.training.objectives import LossContext, get_objective

    cfg = config("jumprelu").sae
    sae = SAE.from_config(cfg, seed=3).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
        sae.b_enc.copy_(torch.randn(cfg.d_sae, generator=g) * 0.1)
    log_theta = (torch.rand(cfg.d_sae, generator=g) * 0.5 + 0.05).log().requires_grad_(True)
    x = sparse_batch(0, rows=64)
    B, eps, lam = x.shape[0], 0.2, 0.7
    out = get_objective("jumprelu")(sae, x, LossContext(lam, log_theta, eps, None, 16, 0.0))
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    got["log_theta"] = log_theta.grad.clone()

    ref = SAE.from_state_dict(cfg, {k: v.detach().clone() for k, v in sae.state_dict().items()}).train()
    theta = log_theta.detach().exp()
    pre = (x - ref.b_dec) @ ref.W_enc + ref.b_enc
    on = (pre > theta).float().detach()
    codes = pre * on
    codes_leaf = codes.detach().requires_grad_(True)
    mse = (codes_leaf @ ref.W_dec + ref.b_dec - x).pow(2).sum(-1).mean()
    (g_codes,) = torch.autograd.grad(mse, codes_leaf)
    loss = (codes @ ref.W_dec + ref.b_dec - x).pow(2).sum(-1).mean() + lam * on.sum(-1).mean()
    loss.backward()
    K = ((pre.detach() - theta).abs() / eps < 0.5).float()  # rectangle kernel
    assert K.sum() > 0 and 0 < on.mean() < 1
    g_theta = -(theta / eps) * (K * g_codes).sum(0) - (lam / B / eps) * K.sum(0)
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(float(out.l0), float(on.sum(-1).mean()))
    for n, p in ref.named_parameters():
        if n != "threshold":
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(got["log_theta"], g_theta * theta, rtol=1e-4, atol=1e-5)
