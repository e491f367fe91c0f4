"""Crosscoder: maths, files (ours and dictionary_learning's), training objectives, resume, the model-pair guard,
and finding a planted fine-tune-only direction."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from toolkit.config import CrosscoderConfig
from toolkit.crosscoder import Crosscoder, PairedActivations, capture_pair, evaluate_crosscoder, split_paired
from toolkit.errors import CheckpointError, NonFiniteError, ShapeMismatchError
from toolkit.training import train_crosscoder

D, S = 16, 48
PAIR = ("base", "base-ft")
SITE = "blocks.1.resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(arch: str = "batchtopk", **kw) -> CrosscoderConfig:
    return CrosscoderConfig(d_in=D, d_sae=S, architecture=arch, k=4 if arch == "batchtopk" else None,
                            models=PAIR, site=SITE, **kw)


def synthetic_pair(n: int = 4096, seed: int = 0) -> tuple[PairedActivations, torch.Tensor]:
    """Sparse features: 0-23 shared, 24-27 only in the fine-tune, 28-31 only in the base; returns the directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(32, 2, D, generator=g)
    dirs[:, 1] = dirs[:, 0]
    dirs[24:28, 0] = 0
    dirs[28:32, 1] = 0
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    f = (torch.rand(n, 32, generator=g) < 0.08).float() * (1 + torch.rand(n, 32, generator=g))
    return PairedActivations(torch.einsum("nf,fmd->nmd", f, dirs) * 3, PAIR, SITE), dirs


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="needs k"):
        CrosscoderConfig(d_in=4, d_sae=8)
    with pytest.raises(ValueError, match="two non-empty names"):
        CrosscoderConfig(d_in=4, d_sae=8, k=2, models=("a",))
    assert CrosscoderConfig.from_dict(_cfg().to_dict()) == _cfg()


def test_save_load_round_trip_is_bit_exact(tmp_path) -> None:
    for arch in ("batchtopk", "relu"):
        cc = Crosscoder(_cfg(arch), seed=1)
        with torch.no_grad():
            cc.b_enc.normal_()
            cc.b_dec.normal_()
            cc.input_scale.copy_(torch.tensor([0.3, 0.7]))
            if arch == "batchtopk":
                cc.threshold.fill_(0.25)
        back = Crosscoder.load(cc.save(tmp_path / arch))
        assert back.cfg == cc.cfg
        for k, v in cc.state_dict().items():
            assert torch.equal(v, back.state_dict()[k]), k
        x = torch.randn(5, 2, D)
        assert torch.equal(cc(x).reconstruction, back(x).reconstruction)


def test_corrupt_or_foreign_folders_are_refused(tmp_path) -> None:
    folder = Crosscoder(_cfg(), seed=0).save(tmp_path / "cc")
    raw = json.loads((folder / "cfg.json").read_text())
    w = folder / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        Crosscoder.load(folder)
    assert raw["kind"] == "crosscoder"


def _dl_reference(s: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dictionary_learning's CrossCoder / BatchTopKCrossCoder maths (threshold path), written out independently."""
    if "activation_mean" in s:
        x = (x - s["activation_mean"]) * s["activation_global_scale"]
    f = torch.relu(torch.einsum("bld,ldf->blf", x, s["encoder.weight"]).sum(1) + s["encoder.bias"])
    if "threshold" in s:
        f = f * (f * s["decoder.weight"].norm(dim=2).sum(0, keepdim=True) > s["threshold"])
    out = torch.einsum("bf,lfd->bld", f, s["decoder.weight"]) + s["decoder.bias"]
    if "activation_mean" in s:
        out = out / s["activation_global_scale"] + s["activation_mean"]
    return f, out


@pytest.mark.parametrize("layout", ["batchtopk.pt", "crosscoder.pt", "hub-folder", "normalizer.pt"])
def test_dictionary_learning_checkpoints_load_with_the_same_maths(tmp_path, layout) -> None:
    g = torch.Generator().manual_seed(3)
    s = {"encoder.weight": torch.randn(2, D, S, generator=g) * 0.3, "encoder.bias": torch.randn(S, generator=g) * 0.1,
         "decoder.weight": torch.randn(2, S, D, generator=g) * 0.3, "decoder.bias": torch.randn(2, D, generator=g),
         "code_normalization_id": torch.tensor(1)}
    if layout != "crosscoder.pt":
        s |= {"k": torch.tensor(4, dtype=torch.int32), "threshold": torch.tensor(0.8)}
    if layout == "normalizer.pt":
        s |= {"activation_mean": torch.randn(2, D, generator=g), "activation_std": torch.rand(2, D, generator=g) + 0.5,
              "activation_global_scale": torch.tensor(0.37), "target_rms": torch.tensor(1.0)}
    if layout == "hub-folder":
        path = tmp_path / "hub"
        path.mkdir()
        save_file({k: v.contiguous() for k, v in s.items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({"activation_dim": D, "dict_size": S, "num_layers": 2, "k": 4}))
    else:
        path = tmp_path / layout
        torch.save({f"_orig_mod.{k}" if layout == "batchtopk.pt" else k: v for k, v in s.items()}, path)
    cc = Crosscoder.from_dictionary_learning(path, models=PAIR, site=SITE)
    assert cc.cfg.architecture == ("relu" if layout == "crosscoder.pt" else "batchtopk")
    assert cc.cfg.models == PAIR and cc.cfg.k == (None if layout == "crosscoder.pt" else 4)
    x = torch.randn(64, 2, D, generator=g) * 2
    f_ref, out_ref = _dl_reference(s, x)
    out = cc(x)
    assert (f_ref > 0).sum() > 0
    torch.testing.assert_close(out.codes, f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.reconstruction, out_ref, atol=1e-4, rtol=1e-5)


def test_dictionary_learning_refuses_what_it_cannot_reproduce(tmp_path) -> None:
    s = {"encoder.weight": torch.zeros(3, D, S), "encoder.bias": torch.zeros(S), "decoder.weight": torch.zeros(3, S, D),
         "decoder.bias": torch.zeros(3, D)}
    torch.save(s, tmp_path / "three.pt")
    with pytest.raises(CheckpointError, match=r"\(2, d_in, d_sae\)"):
        Crosscoder.from_dictionary_learning(tmp_path / "three.pt")
    s2 = {"encoder.weight": torch.zeros(2, D, S), "encoder.bias": torch.zeros(S), "decoder.weight": torch.zeros(2, S, D),
          "decoder.bias": torch.zeros(2, D), "code_normalization_id": torch.tensor(2)}
    torch.save(s2, tmp_path / "sae_norm.pt")
    with pytest.raises(CheckpointError, match="only CROSSCODER"):
        Crosscoder.from_dictionary_learning(tmp_path / "sae_norm.pt")


def test_batchtopk_keeps_k_times_batch_codes_in_training_and_thresholds_at_inference() -> None:
    cc = Crosscoder(_cfg(), seed=0)
    x = torch.randn(32, 2, D)
    cc.train()
    codes = cc.encode(x)
    assert int((codes > 0).sum()) == 4 * 32
    assert len(set((codes > 0).sum(1).tolist())) > 1  # per batch, not per token
    cc.eval()
    assert torch.equal((cc.encode(x) > 0).sum(1), torch.full((32,), 4))  # no threshold yet: per-token top-k
    with torch.no_grad():
        cc.threshold.fill_(0.5)
    pre = cc.pre_activations(cc.normalize(x))
    f = torch.relu(pre)
    assert torch.equal(cc.encode(x), f * (f * cc.code_weights() > 0.5))


def test_batchtopk_training_estimates_the_threshold_and_recovers_features() -> None:
    acts, _ = synthetic_pair()
    run = train_crosscoder(_cfg(), acts, total_steps=250, batch_size=256, lr=1e-2, log_every=10, progress=False)
    cc = run.crosscoder
    assert float(cc.threshold) > 0
    assert run.history[-1]["l0"] == pytest.approx(4.0)
    stats = evaluate_crosscoder(cc, acts)
    assert stats["fvu"] < 0.15 and 2 <= stats["l0"] <= 8, stats
    assert run.history[-1]["fvu"] < run.history[0]["fvu"] / 3


def test_l1_variant_trains() -> None:
    acts, _ = synthetic_pair()
    with torch.no_grad():  # as in a notebook that turned gradients off
        run = train_crosscoder(_cfg("relu"), acts, total_steps=250, batch_size=256, lr=1e-2, l1_coefficient=0.3,
                               log_every=10, progress=False)
    assert run.history[-1]["loss"] < run.history[0]["loss"] / 3
    stats = evaluate_crosscoder(run.crosscoder, acts)
    assert stats["fvu"] < 0.3 and stats["l0"] < S / 4, stats


def test_training_is_deterministic_and_resume_is_exact(tmp_path) -> None:
    acts, _ = synthetic_pair(1024)
    kw = {"total_steps": 12, "batch_size": 64, "progress": False, "dead_after_tokens": 128, "checkpoint_every": 4,
          "log_every": 2}
    a = train_crosscoder(_cfg(), acts, out_dir=tmp_path / "a", **kw)
    b = train_crosscoder(_cfg(), acts, **kw)
    for k, v in a.crosscoder.state_dict().items():
        assert torch.equal(v, b.crosscoder.state_dict()[k]), k
    assert a.history == b.history
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step_00000008", "step_00000012"]  # two kept
    assert Crosscoder.load(tmp_path / "a" / "crosscoder").cfg == _cfg()
    (tmp_path / "a" / "checkpoints" / "step_00000012" / "manifest.json").unlink()  # a crash before the manifest
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        resumed = train_crosscoder(_cfg(), acts, out_dir=tmp_path / "a", resume=True, **kw)
    for k, v in a.crosscoder.state_dict().items():
        assert torch.equal(v, resumed.crosscoder.state_dict()[k]), k
    assert resumed.history == a.history and resumed.tokens == a.tokens and resumed.scale == a.scale


def test_old_crosscoder_checkpoints_are_refused_with_a_way_to_keep_their_weights(tmp_path) -> None:
    """Checkpoints of the trainer before the shared loop (<dir>/step-N/) cannot resume; their weights still load."""
    from toolkit.io import save_weight_folder
    from toolkit.training.crosscoder_trainer import load_legacy_checkpoint

    acts, _ = synthetic_pair(256)
    cc = Crosscoder(_cfg(), seed=3)
    old = tmp_path / "run" / "step-00000010"
    save_weight_folder(old, {**{f"cc.{k}": v for k, v in cc.state_dict().items()}, "since_fired": torch.zeros(S)},
                       {"crosscoder": _cfg().to_dict(), "training": {}, "step": 10, "adam_step": 10, "skipped": 0,
                        "history": {}})
    with pytest.raises(CheckpointError, match=r"older crosscoder trainer.*load_legacy_checkpoint"):
        train_crosscoder(_cfg(), acts, out_dir=tmp_path / "run", resume=True, total_steps=2, progress=False)
    loaded = load_legacy_checkpoint(old)
    for k, v in cc.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    save_weight_folder(tmp_path / "sae-like", {"x": torch.zeros(1)}, {"sae": {}})
    with pytest.raises(CheckpointError, match="not a crosscoder checkpoint"):
        load_legacy_checkpoint(tmp_path / "sae-like")


def test_an_sae_checkpoint_does_not_resume_a_crosscoder_and_vice_versa(tmp_path) -> None:
    from toolkit.config import SAEConfig, TrainConfig
    from toolkit.training import train_sae

    acts, _ = synthetic_pair(256)
    train_crosscoder(_cfg(), acts, out_dir=tmp_path / "cc", total_steps=2, batch_size=64, progress=False)
    sae_cfg = TrainConfig(SAEConfig(D, S, "topk", k=2), total_steps=2, batch_size=64)
    with pytest.raises(CheckpointError, match="crosscoder checkpoint resumes with train_crosscoder"):
        train_sae(sae_cfg, [torch.randn(64, D)] * 4, out_dir=tmp_path / "cc", resume=True, progress=False)
    train_sae(sae_cfg, [torch.randn(64, D)] * 4, out_dir=tmp_path / "sae", progress=False)
    with pytest.raises(CheckpointError, match="SAE checkpoint resumes with train_sae"):
        train_crosscoder(_cfg(), acts, out_dir=tmp_path / "sae", resume=True, total_steps=2, batch_size=64,
                         progress=False)


def test_guard_refuses_activations_of_another_pair_site_or_width(tiny, tmp_path) -> None:
    """Reliability case 15: the error names what the crosscoder expects and what it got."""
    cc = Crosscoder(_cfg(), seed=0)
    x = torch.randn(8, 2, D)
    with pytest.raises(ValueError, match=r"expects \(base, fine-tuned\) = \('base', 'base-ft'\).*\('base', 'other'\)"):
        cc.encode(PairedActivations(x, ("base", "other"), SITE))
    with pytest.raises(ValueError, match="swapped"):
        cc(PairedActivations(x, PAIR[::-1], SITE))
    with pytest.raises(ValueError, match=r"site blocks\.1\.resid_post.*got activations from site blocks\.0\.resid_post"):
        train_crosscoder(_cfg(), PairedActivations(x, PAIR, "blocks.0.resid_post"), total_steps=1, progress=False)
    with pytest.raises(ShapeMismatchError, match="d_in 16; got activations 8 wide"):
        cc.encode(torch.randn(8, 2, 8))
    with pytest.raises(ShapeMismatchError, match=r"expected \(\.\.\., 2, 16\)"):
        cc.encode(torch.randn(8, 3, D))

    from toolkit.tracing import fill_cache

    def fake_capture(model, contexts, sites, *, batch_size, start, **kw):
        for i in range(start, contexts.shape[0], batch_size):
            b = min(batch_size, contexts.shape[0] - i)
            yield i, {s.name: torch.randn(b, contexts.shape[1], 64) for s in sites}

    ctx = torch.randint(5, 50, (4, 8))
    caches = {}
    for name, site in (("base", SITE), ("other", SITE), ("base-ft", "blocks.0.resid_post")):
        tiny.name = name
        caches[name] = fill_cache(tiny, site, ctx, tmp_path / name, capture_fn=fake_capture, progress=False)
    tiny.name = "tiny-gemma2-seed0"
    cc64 = Crosscoder(CrosscoderConfig(d_in=64, d_sae=8, k=2, models=PAIR, site=SITE), seed=0)
    with pytest.raises(ValueError, match=r"\('base', 'other'\)"):
        cc64.check_caches(caches["base"], caches["other"])
    with pytest.raises(ValueError, match=r"reads site blocks\.1\.resid_post.*holds \['blocks\.0\.resid_post'\]"):
        train_crosscoder(cc64.cfg, (caches["base"], caches["base-ft"]), total_steps=1, progress=False)
    loaded = PairedActivations.from_caches(caches["base"], caches["other"], tokens=ctx)
    assert loaded.models == ("base", "other") and loaded.site == SITE and len(loaded) == 4 * 8
    assert torch.equal(loaded.acts[:, 0], caches["base"].shard(0)[SITE])
    assert loaded.positions.tolist() == [[c, p] for c in range(4) for p in range(8)]
    with pytest.raises(ValueError, match=r"\('base', 'other'\)"):
        cc64.encode(loaded)


def test_finds_a_direction_planted_in_the_fine_tune(tiny) -> None:
    """Reduced setting: the 'fine-tune' of the tiny model adds a direction to its layer-1 residual stream wherever
    the previous token is one of 20 trigger tokens; the top fine-tune-only latent must be that direction, firing
    at those positions."""
    from toolkit.analysis.diff import diff_table, latent_contexts, share_of_contexts, top_latents

    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(4, tiny.vocab_size, (96, 32), generator=g)
    ctx[:, 0] = tiny.bos_token_id
    base = capture_pair(tiny, tiny, ctx, SITE, batch_size=96, progress=False)
    triggers = torch.arange(40, 60)
    planted = torch.zeros_like(ctx, dtype=torch.bool)
    planted[:, 1:] = torch.isin(ctx[:, :-1], triggers)
    v = torch.randn(64, generator=g)
    v = v / v.norm()
    on = planted[base.positions[:, 0], base.positions[:, 1]]
    acts = base.acts.clone()
    acts[:, 1] += 16.0 * on[:, None] * v
    pair = PairedActivations(acts, ("tiny", "tiny-ft"), SITE, ctx, base.positions)
    train, held = split_paired(pair, (0.75, 0.25))
    cfg = CrosscoderConfig(d_in=64, d_sae=128, k=8, models=("tiny", "tiny-ft"), site=SITE)
    cc = train_crosscoder(cfg, train, total_steps=300, batch_size=256, lr=3e-3, progress=False).crosscoder

    table = diff_table(cc, held)
    top = top_latents(table, 3, min_freq=0.005)
    assert top, table.counts()
    j = top[0]
    assert table.cls[j] == "ft-only" and not table.artifact[j]
    assert torch.nn.functional.cosine_similarity(cc.W_dec[j, 1].detach(), v, dim=0) > 0.9
    contexts = latent_contexts(cc, held, j, tiny.tokenizer, k=20)
    assert share_of_contexts(contexts, planted) >= 0.9
    assert table.freq[j] == pytest.approx(float(on.float().mean()), abs=0.03)


def test_non_finite_batches_are_skipped_and_only_non_finite_data_raises() -> None:
    acts, _ = synthetic_pair(512)
    x = acts.acts.clone()
    x[7, 1, 0] = float("nan")  # one row: the batch holding it is skipped once per epoch
    run = train_crosscoder(_cfg(), PairedActivations(x, PAIR, SITE), total_steps=12, batch_size=128, log_every=4,
                           progress=False)
    assert run.steps == 12 and 1 <= run.skipped_steps <= 4 and run.history[-1]["skipped_steps"] == run.skipped_steps
    assert all(bool(torch.isfinite(v).all()) for v in run.crosscoder.state_dict().values())
    x[:, 1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="finite"):
        train_crosscoder(_cfg(), PairedActivations(x, PAIR, SITE), total_steps=3, batch_size=128, progress=False)
