"""Training reliability: NaN/inf batches and gradients are skipped with weights unchanged (case 4), a crash while
saving a checkpoint leaves the previous one loadable and temp folders are never taken for checkpoints (case 9),
and a resumed run equals an uninterrupted one exactly (case 10)."""

from __future__ import annotations

import shutil

import pytest
import torch

import toolkit.training.checkpoint as checkpoint_mod
import toolkit.training.sae_trainer as train_mod
from toolkit.config import SAEConfig, TrainConfig
from toolkit.errors import CheckpointError, NonFiniteError
from toolkit.io import TMP_PREFIX
from toolkit.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from toolkit.training.sae_trainer import train_sae

D, BATCH = 16, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(i: int) -> torch.Tensor:
    """Deterministic batch i: sparse combinations of 32 fixed atoms."""
    atoms = torch.randn(32, D, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1 + i)
    codes = torch.rand(BATCH, 32, generator=g) * (torch.rand(BATCH, 32, generator=g) < 0.1)
    return 4 * codes @ atoms + 0.5


def source(start: int):
    i = start
    while True:
        yield batch(i)
        i += 1


def config(arch: str = "topk", steps: int = 2000, **kw) -> TrainConfig:
    extra = {"topk": {"k": 3}, "batchtopk": {"k": 3}, "matryoshka": {"k": 3, "matryoshka_groups": (8, 64)}}
    defaults = {"lr": 2e-3, "batch_size": BATCH, "total_steps": steps, "log_every": 7, "checkpoint_every": 250,
                "dead_after_tokens": 20 * BATCH, "warmup_steps": min(10, steps // 2), "decay": "cosine", "decay_start": 0.5}
    if arch == "jumprelu":
        defaults.update(target_l0=3.0, sparsity_warmup_steps=min(20, steps // 2), threshold_lr_scale=10.0,
                        l0_coefficient=0.1)
    if arch == "relu":
        defaults.update(target_l0=3.0, sparsity_warmup_steps=min(20, steps // 2))
    return TrainConfig(SAEConfig(D, 64, arch, **extra.get(arch, {})), **{**defaults, **kw})


class Killed(Exception):
    pass


def kill_at(step: int):
    def callback(s: int, metrics: dict) -> None:
        if s == step:
            raise Killed(f"killed after step {s}")
    return callback


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- case 10: exact resume


@pytest.mark.slow
def test_resume_equals_uninterrupted_run_2000_steps(tmp_path):
    cfg = config("topk")
    full = train_sae(cfg, source, out_dir=tmp_path / "full", progress=False)
    with pytest.raises(Killed):
        train_sae(cfg, source, out_dir=tmp_path / "cut", progress=False, callback=kill_at(1234))
    assert latest_checkpoint(tmp_path / "cut").name == "step_00001000"
    resumed = train_sae(cfg, source, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps == full.steps == 2000
    assert_same_weights(resumed.sae, full.sae)
    assert resumed.history == full.history
    assert resumed.tokens == full.tokens and resumed.scale == full.scale
    # the checkpoints themselves: optimizer state, dead counters, RNG states are equal too
    a = load_checkpoint(latest_checkpoint(tmp_path / "full")).tensors
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut")).tensors
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk", "matryoshka", "relu"])
def test_resume_is_exact_for_every_architecture(tmp_path, arch):
    cfg = config(arch, steps=120, checkpoint_every=40)
    full = train_sae(cfg, source, out_dir=tmp_path / "full", progress=False)
    with pytest.raises(Killed):
        train_sae(cfg, source, out_dir=tmp_path / "cut", progress=False, callback=kill_at(95))
    resumed = train_sae(cfg, source, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert_same_weights(resumed.sae, full.sae)
    assert resumed.history == full.history


@pytest.mark.parametrize("arch", ["batchtopk", "relu"])
def test_crosscoder_resume_is_exact(tmp_path, arch):
    """The shared loop gives crosscoders the same guarantee: killed, resumed, equal to an uninterrupted run."""
    from toolkit.config import CrosscoderConfig, CrosscoderTraining
    from toolkit.training import train_crosscoder

    g = torch.Generator().manual_seed(1)
    pairs = torch.stack([batch(i) for i in range(40)]).reshape(-1, D)
    acts = torch.stack([pairs, pairs @ torch.randn(D, D, generator=g) / D ** 0.5], dim=1)
    cfg = CrosscoderConfig(d_in=D, d_sae=48, architecture=arch, k=3 if arch == "batchtopk" else None)
    tr = CrosscoderTraining(total_steps=120, batch_size=BATCH, lr=2e-3, checkpoint_every=40, log_every=7,
                            dead_after_tokens=20 * BATCH, warmup_steps=10, sparsity_warmup_steps=20)
    full = train_crosscoder(cfg, acts, tr, out_dir=tmp_path / "full", progress=False)
    with pytest.raises(Killed):
        train_crosscoder(cfg, acts, tr, out_dir=tmp_path / "cut", progress=False, callback=kill_at(95))
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000080"
    resumed = train_crosscoder(cfg, acts, tr, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps == full.steps == 120
    assert_same_weights(resumed.crosscoder, full.crosscoder)
    assert resumed.history == full.history and resumed.tokens == full.tokens and resumed.scale == full.scale
    a = load_checkpoint(latest_checkpoint(tmp_path / "full")).tensors
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut")).tensors
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(CheckpointError, match="different settings"):
        train_crosscoder(cfg, acts, tr, out_dir=tmp_path / "cut", resume=True, progress=False, lr=1e-3)


def test_sae_checkpoints_written_before_the_shared_loop_still_resume(tmp_path):
    """The SAE checkpoint layout (format 1: state.safetensors keys sae.*, optim.<i>.*, train.since_fired, rng.*;
    state.json counters, scale, log_coef, history, window, RNG positions) is unchanged: such a checkpoint resumes."""
    cfg = config("topk", steps=60, checkpoint_every=20)
    full = train_sae(cfg, source, out_dir=tmp_path / "full", progress=False)
    ck = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000040")
    legacy_keys = {"config", "format", "step", "position", "tokens", "skipped", "consecutive", "thr_count", "scale",
                   "log_coef", "history", "window", "rng_python", "rng_numpy"}
    assert set(ck.state) == legacy_keys
    assert {k.split(".")[0] for k in ck.tensors} == {"sae", "optim", "train", "rng"}
    checkpoint_mod.save_checkpoint(tmp_path / "old", 40, ck.tensors, {k: v for k, v in ck.state.items()
                                                                      if k not in ("format", "step")})
    resumed = train_sae(cfg, source, out_dir=tmp_path / "old", resume=True, progress=False)
    assert_same_weights(resumed.sae, full.sae)


def test_resume_from_an_activation_cache_position(tmp_path, tiny):
    from toolkit.tracing import fill_cache

    contexts = torch.randint(5, 60, (24, 9), generator=torch.Generator().manual_seed(0))
    contexts[:, 0] = tiny.bos_token_id
    cache = fill_cache(tiny, "blocks.0.resid_post", contexts, tmp_path / "cache", shard_contexts=8, progress=False)
    cfg = TrainConfig(SAEConfig(cache.d, 32, "topk", k=4), lr=1e-2, batch_size=32, total_steps=30, checkpoint_every=4,
                      log_every=3)
    full = train_sae(cfg, cache, out_dir=tmp_path / "full", progress=False)  # 6 batches an epoch: several epochs
    with pytest.raises(Killed):
        train_sae(cfg, cache, out_dir=tmp_path / "cut", progress=False, callback=kill_at(14))
    resumed = train_sae(cfg, tmp_path / "cache", out_dir=tmp_path / "cut", resume=True, progress=False)
    assert_same_weights(resumed.sae, full.sae)


def test_resume_refuses_another_config_and_fresh_runs_refuse_old_checkpoints(tmp_path):
    cfg = config("topk", steps=60, checkpoint_every=20)
    with pytest.raises(Killed):
        train_sae(cfg, source, out_dir=tmp_path, progress=False, callback=kill_at(30))
    with pytest.raises(CheckpointError, match="already holds checkpoints .*resume=True"):
        train_sae(cfg, source, out_dir=tmp_path, progress=False)
    other = config("topk", steps=60, checkpoint_every=20, lr=1e-3)
    with pytest.raises(CheckpointError, match="different config: lr was 0.002, now 0.001"):
        train_sae(other, source, out_dir=tmp_path, resume=True, progress=False)
    # cadence fields may change on resume
    done = train_sae(config("topk", steps=60, checkpoint_every=7, log_every=7), source, out_dir=tmp_path, resume=True,
                     progress=False)
    assert done.steps == 60
    with pytest.raises(ValueError, match="resume=True needs the out_dir"):
        train_sae(cfg, source, resume=True, progress=False)


# ---------------------------------------------------------------- case 9: crash during save


def test_crash_during_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = config("topk", steps=100, checkpoint_every=20)
    real = checkpoint_mod.atomic_write_json
    calls = {"n": 0}

    def flaky_write_json(path, obj):
        calls["n"] += 1
        if calls["n"] == 2:  # the 2nd checkpoint's state.json: tensors written, state half-way, no manifest
            path.write_text('{"truncated": ')
            raise OSError("disk full")
        return real(path, obj)

    monkeypatch.setattr(checkpoint_mod, "atomic_write_json", flaky_write_json)
    with pytest.raises(OSError, match="disk full"):
        train_sae(cfg, source, out_dir=tmp_path, progress=False)
    monkeypatch.setattr(checkpoint_mod, "atomic_write_json", real)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000020"]
    assert latest_checkpoint(tmp_path).name == "step_00000020"
    assert load_checkpoint(latest_checkpoint(tmp_path)).state["step"] == 20
    # a leftover temp folder, even one that looks complete, is never taken for a checkpoint
    fake = tmp_path / "checkpoints" / f"{TMP_PREFIX}step_00000099-1"
    shutil.copytree(tmp_path / "checkpoints" / "step_00000020", fake)
    assert latest_checkpoint(tmp_path).name == "step_00000020"
    resumed = train_sae(cfg, source, out_dir=tmp_path, resume=True, progress=False)
    full = train_sae(cfg, source, out_dir=tmp_path / "full", progress=False)
    assert_same_weights(resumed.sae, full.sae)
    assert not fake.exists()  # cleaned by the next save
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000080", "step_00000100"]


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    cfg = config("topk", steps=60, checkpoint_every=20)
    with pytest.raises(Killed):
        train_sae(cfg, source, out_dir=tmp_path, progress=False, callback=kill_at(45))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000020", "step_00000040"]
    weights = tmp_path / "checkpoints" / "step_00000040" / "state.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint step_00000040.*sha256"):
        assert latest_checkpoint(tmp_path).name == "step_00000020"
    with pytest.warns(UserWarning, match="step_00000040"):
        resumed = train_sae(cfg, source, out_dir=tmp_path, resume=True, progress=False)
    full = train_sae(cfg, source, out_dir=tmp_path / "full", progress=False)
    assert_same_weights(resumed.sae, full.sae)
    state = tmp_path / "checkpoints" / "step_00000060" / "state.json"
    state.write_text(state.read_text().replace('"step": 60', '"step": 61'))
    with pytest.raises(CheckpointError, match="state.json: sha256"):
        load_checkpoint(state.parent)


# ---------------------------------------------------------------- case 4: non-finite batches and gradients


def test_non_finite_batches_are_skipped_and_counted_weights_unchanged():
    clean = [batch(i) for i in range(12)]
    dirty = clean[:4] + [torch.full((BATCH, D), float("nan"))] + clean[4:7]
    inf = clean[7].clone()
    inf[3, 5] = float("inf")
    dirty += [inf] + clean[7:]
    huge = clean[9].clone() * 1e30  # finite activations whose squared error overflows: non-finite loss
    dirty = dirty[:10] + [huge] + dirty[10:]
    cfg = config("topk", steps=12, normalize_batches=2, checkpoint_every=None, log_every=3)
    ref = train_sae(cfg, clean, progress=False)
    got = train_sae(cfg, dirty, progress=False)  # 15 batches: 12 steps and 3 skipped
    assert got.skipped_steps == 3 and got.steps == 12 and got.tokens == 12 * BATCH
    assert_same_weights(got.sae, ref.sae)
    assert got.history[-1]["skipped_steps"] == 3


def test_non_finite_gradient_skips_the_step(monkeypatch):
    real = train_mod.get_objective

    def poisoned(name):
        objective = real(name)
        calls = {"n": 0}

        def wrapped(sae, x, ctx):
            out = objective(sae, x, ctx)
            calls["n"] += 1
            if calls["n"] == 3:  # finite loss, NaN gradient (the classic where/sqrt trap)
                bad = torch.where(torch.tensor(False), torch.sqrt(-sae.W_enc.sum().abs() - 1), 0.0)
                out = out._replace(loss=out.loss + bad)
                assert torch.isfinite(out.loss)
            return out
        return wrapped

    # normalization and b_dec come from batch 0 only, so both runs see the same start
    cfg = config("topk", steps=5, checkpoint_every=None, normalize_batches=1)
    ref = train_sae(cfg, [batch(i) for i in (0, 1, 3, 4, 5)], progress=False)
    monkeypatch.setattr(train_mod, "get_objective", poisoned)
    got = train_sae(cfg, [batch(i) for i in range(6)], progress=False)
    assert got.skipped_steps == 1 and got.steps == 5
    assert_same_weights(got.sae, ref.sae)


def test_only_non_finite_data_raises():
    nan = [torch.full((BATCH, D), float("nan"))] * 20
    with pytest.raises(NonFiniteError, match="none of the first 8 batches is finite"):
        train_sae(config("topk", steps=5), nan, progress=False)
    data = [batch(0)] + nan
    with pytest.raises(NonFiniteError, match="5 consecutive steps skipped"):
        train_sae(config("topk", steps=10, normalize_batches=1, max_consecutive_skips=5), data, progress=False)
