"""Data-parallel training: two CPU processes (gloo) train SAEs and a crosscoder; the result equals one process over
the same global batches, and a two-process run killed mid-way resumes to the same parameters.

Tolerance: float64 parameters; two-process vs one-process agree to rtol 1e-9 / atol 1e-12 (only the order of
float sums differs: each rank sums its half of the batch, then the all-reduce adds the halves); a resumed
two-process run equals the uninterrupted one exactly (same ranks, same reduction order)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from toolkit.config import CrosscoderConfig, CrosscoderTraining, SAEConfig, TrainConfig
from toolkit.training import train_crosscoder, train_sae
from toolkit.training.checkpoint import TMP_PREFIX, latest_checkpoint, list_checkpoints, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

D, BATCH, STEPS, KILL_AT = 16, 64, 8, 5
ARCHS = ("batchtopk", "jumprelu")


def sae_config(arch: str) -> TrainConfig:
    extra = {"k": 4} if arch == "batchtopk" else {}
    kw = {"target_l0": 4.0, "l0_coefficient": 0.1, "sparsity_warmup_steps": 2} if arch == "jumprelu" else {"aux_k": 8}
    # dead after one batch: AuxK (and its global-variance normalization) engages within the run
    return TrainConfig(SAEConfig(D, 64, arch, dtype="float64", **extra), lr=3e-3, batch_size=BATCH,
                       total_steps=STEPS, checkpoint_every=3, keep_checkpoints=5, dead_after_tokens=BATCH, log_every=1,
                       seed=1, **kw)


CC = CrosscoderConfig(d_in=D, d_sae=48, k=4, models=("a", "b"), site="blocks.0.resid_post", dtype="float64")
CC_TRAIN = CrosscoderTraining(lr=3e-3, batch_size=BATCH, total_steps=STEPS, checkpoint_every=3, keep_checkpoints=5,
                              dead_after_tokens=BATCH, log_every=1, seed=1)


def batches(start: int):
    """Batch i: sparse non-negative mixtures of 24 fixed directions plus noise, deterministic in i."""
    dirs = torch.randn(24, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    i = start
    while True:
        g = torch.Generator().manual_seed(1000 + i)
        codes = torch.rand(BATCH, 24, generator=g, dtype=torch.float64) * (torch.rand(BATCH, 24, generator=g) < 0.15)
        yield 3 * codes @ dirs + 0.05 * torch.randn(BATCH, D, generator=g, dtype=torch.float64) + 1.0
        i += 1


def batches_with_nan(start: int):
    """As `batches`, but batch 2 has a NaN in its last row: only rank 1's slice sees it."""
    for i, x in enumerate(batches(start), start):
        if i == 2:
            x = x.clone()
            x[-1, 0] = torch.nan
        yield x


def paired() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(40 * BATCH // 4, D, generator=g, dtype=torch.float64).relu() * 2
    return torch.stack([base, base + 0.3 * torch.randn(base.shape, generator=g, dtype=torch.float64)], 1).float()


def train_all(root: Path, *, resume: bool = False, kill_at: int | None = None) -> None:
    """Train every case into root/<case>; with kill_at, the process kills itself after that step."""

    def stop(step: int, _metrics: dict) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    cb = stop if kill_at is not None else None
    for arch in ARCHS:
        train_sae(sae_config(arch), batches, out_dir=root / arch, resume=resume, progress=False, callback=cb)
    train_sae(sae_config("batchtopk"), batches_with_nan, out_dir=root / "nan", resume=resume, progress=False,
              callback=cb)
    train_crosscoder(CC, paired(), CC_TRAIN, out_dir=root / "crosscoder", resume=resume, progress=False,
                     callback=cb)


def _worker(rank: int, world: int, store: str, root: str, resume: bool, kill_at: int | None) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        train_all(Path(root), resume=resume, kill_at=kill_at)
    finally:
        dist.destroy_process_group()


def launch(tmp: Path, root: Path, *, resume: bool = False, kill_at: int | None = None, world: int = 2) -> list[int]:
    """Run train_all in `world` spawned processes; their exit codes."""
    store = tmp / f"store-{len(list(tmp.glob('store-*')))}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(store), str(root), resume, kill_at)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(latest_checkpoint(out)).tensors.items() if not k.startswith("rng.")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    single, two, killed = tmp / "single", tmp / "two", tmp / "killed"
    train_all(single)
    assert launch(tmp, two) == [0, 0]
    assert launch(tmp, killed, kill_at=KILL_AT) == [-signal.SIGKILL] * 2
    return {"single": single, "two": two, "killed": killed, "tmp": tmp}


CASES = (*ARCHS, "nan", "crosscoder")


@pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo processes are exercised on Linux CI")
@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_process_over_the_same_global_batches(runs, case):
    one, two = final_tensors(runs["single"] / case), final_tensors(runs["two"] / case)
    assert one.keys() == two.keys()
    assert any(k.startswith("optim.") for k in one) and "train.since_fired" in one
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-9, atol=1e-12, msg=f"{case}: {k}")
    ck_one = load_checkpoint(latest_checkpoint(runs["single"] / case)).state
    ck_two = load_checkpoint(latest_checkpoint(runs["two"] / case)).state
    assert ck_two["tokens"] == ck_one["tokens"] == STEPS * BATCH and ck_two["position"] == ck_one["position"]
    assert ck_two["skipped"] == ck_one["skipped"]
    for h1, h2 in zip(ck_one["history"], ck_two["history"], strict=True):
        assert h2 == pytest.approx(h1, rel=1e-9, abs=1e-12)
    # the dead-latent counters (global tokens) made AuxK engage, so its global-variance normalization was tested
    assert case == "jumprelu" or any(h["aux"] > 0 for h in ck_two["history"])
    assert len(ck_two["history"]) == STEPS, ck_two["history"]


@pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo processes are exercised on Linux CI")
def test_a_non_finite_slice_skips_the_step_on_every_rank(runs):
    one = load_checkpoint(latest_checkpoint(runs["single"] / "nan")).state
    two = load_checkpoint(latest_checkpoint(runs["two"] / "nan")).state
    assert one["skipped"] == two["skipped"] == 1 and two["step"] == STEPS and two["position"] == STEPS + 1


@pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo processes are exercised on Linux CI")
def test_batchtopk_threshold_is_reduced_across_ranks(runs):
    one, two = final_tensors(runs["single"] / "batchtopk"), final_tensors(runs["two"] / "batchtopk")
    assert float(one["sae.threshold"]) > 0
    assert float(two["sae.threshold"]) == pytest.approx(float(one["sae.threshold"]), rel=1e-9)
    cc1, cc2 = final_tensors(runs["single"] / "crosscoder"), final_tensors(runs["two"] / "crosscoder")
    assert float(cc2["crosscoder.threshold"]) == pytest.approx(float(cc1["crosscoder.threshold"]), rel=1e-9)


@pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo processes are exercised on Linux CI")
def test_killed_two_process_run_resumes_and_matches(runs):
    killed, tmp = runs["killed"], runs["tmp"]
    # rank 0 alone wrote complete checkpoints (steps 3; the kill came at step 5, before the next one)
    first = killed / ARCHS[0]
    assert [p.name for p in list_checkpoints(first)] == ["step_00000003"]
    assert not list((first / "checkpoints").glob(TMP_PREFIX + "*"))
    assert not (killed / ARCHS[1]).exists()  # the first case's kill stopped the job
    assert launch(tmp, killed, resume=True) == [0, 0]
    for case in CASES:
        resumed, straight = final_tensors(killed / case), final_tensors(runs["two"] / case)
        for k in straight:
            assert torch.equal(resumed[k], straight[k]), f"{case}: {k}"
