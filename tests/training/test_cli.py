"""`python -m toolkit train CONFIG`: a TOML job trains an SAE from an activation cache, in one process and under
`torchrun --nproc-per-node 2` (gloo), to the same SAE; bad configs get errors naming the key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.__main__ import main
from toolkit.config import CacheConfig
from toolkit.errors import ArgumentError
from toolkit.sae import SAE
from toolkit.tracing import ActivationCache
from toolkit.training.cli import read_job

pytestmark = pytest.mark.usefixtures("one_thread")

SITE, D = "blocks.0.resid_post", 16
ROOT = Path(__file__).resolve().parents[2]


def synthetic_cache(folder: Path, *, shards: int = 4, rows: int = 64, seed: int = 0,
                    model: str = "synthetic") -> ActivationCache:
    """An activation cache of sparse synthetic rows (no model): `shards` shards of `rows` rows at SITE."""
    cfg = CacheConfig(model=model, sites=(SITE,), d=(D,), ctx_len=rows // 8 + 1, n_contexts=8 * shards,
                      fingerprint="0" * 64, shard_contexts=8)
    cache = ActivationCache.create(folder, cfg)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(24, D, generator=g)
    for i in range(shards):
        codes = torch.rand(rows, 24, generator=g) * (torch.rand(rows, 24, generator=g) < 0.15)
        cache.write_shard(i, {SITE: 3 * codes @ dirs + 1.0}, torch.arange(rows))
    cache.close()
    return ActivationCache.open(folder)


JOB = """
kind = "sae"
data = "acts"
out_dir = "{out}"
[train]
batch_size = 32
total_steps = 12
checkpoint_every = 5
lr = 0.003
seed = 3
[train.sae]
d_in = 16
d_sae = 48
architecture = "batchtopk"
k = 4
site = "blocks.0.resid_post"
dtype = "float64"
"""


@pytest.fixture
def job_dir(tmp_path) -> Path:
    synthetic_cache(tmp_path / "acts")
    for name in ("one", "two"):
        (tmp_path / f"{name}.toml").write_text(JOB.format(out=f"run-{name}"))
    return tmp_path


def _sae(folder: Path) -> SAE:
    return SAE.load(folder)


def test_train_command_trains_and_resumes_in_one_process(job_dir, capsys):
    assert main(["train", str(job_dir / "one.toml"), "--no-progress"]) == 0
    assert "trained sae: 12 steps, 384 tokens" in capsys.readouterr().out
    sae = _sae(job_dir / "run-one" / "sae")
    assert sae.cfg.architecture == "batchtopk" and float(sae.threshold) > 0
    # resume is the default: a second launch finds the finished run and trains no further
    assert main(["train", str(job_dir / "one.toml"), "--no-progress"]) == 0
    assert "12 steps" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed beside this python")
def test_torchrun_two_processes_train_the_same_sae(job_dir):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "toolkit", "train", "two.toml", "--no-progress"]
    done = subprocess.run(cmd, cwd=job_dir, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained sae: 12 steps, 384 tokens") == 1  # rank 0 alone reports
    assert main(["train", str(job_dir / "one.toml"), "--no-progress"]) == 0
    one, two = _sae(job_dir / "run-one" / "sae"), _sae(job_dir / "run-two" / "sae")
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[k], v, rtol=1e-9, atol=1e-12, msg=k)


CC_JOB = {
    "kind": "crosscoder", "data": ["base", "ft"], "out_dir": "cc",
    "crosscoder": {"d_in": 16, "d_sae": 32, "k": 4, "models": ["base-model", "ft-model"], "site": SITE},
    "train": {"batch_size": 32, "total_steps": 6, "lr": 0.003},
}


def test_train_command_trains_a_crosscoder_from_two_caches(tmp_path, capsys):
    synthetic_cache(tmp_path / "base", model="base-model")
    synthetic_cache(tmp_path / "ft", model="ft-model", seed=1)
    (tmp_path / "cc.json").write_text(json.dumps(CC_JOB))
    assert main(["train", str(tmp_path / "cc.json"), "--no-progress"]) == 0
    assert "trained crosscoder: 6 steps, 192 tokens" in capsys.readouterr().out
    assert (tmp_path / "cc" / "crosscoder").is_dir()
    wrong = {**CC_JOB, "crosscoder": {**CC_JOB["crosscoder"], "models": ["other", "ft-model"]}, "out_dir": "cc2"}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    assert main(["train", str(tmp_path / "wrong.json"), "--no-progress"]) == 2
    assert "base-model" in capsys.readouterr().err


def test_bad_configs_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    with pytest.raises(ArgumentError, match="no such config file"):
        read_job(tmp_path / "missing.toml")
    bad.write_text('kind = "sae"\ndata = "a"\nout_dir = "o"\nlr = 1\n[train]\n')
    with pytest.raises(ArgumentError, match=r"unknown key\(s\) \['lr'\]"):
        read_job(bad)
    bad.write_text('kind = "crosscoder"\ndata = "a"\nout_dir = "o"\n[train]\n')
    with pytest.raises(ArgumentError, match=r"data must be \[base cache folder, fine-tuned cache folder\]"):
        read_job(bad)
    bad.write_text('data = "a"\nout_dir = "o"\n[train]\nbatch_size = 8\n')
    with pytest.raises(ArgumentError, match="TrainConfig needs key 'sae'"):
        read_job(bad)
    js = tmp_path / "bad.json"
    js.write_text(json.dumps({"data": "a", "out_dir": "o", "train": {"sae": {"d_in": 4}}}))
    with pytest.raises(ArgumentError, match="needs key"):
        read_job(js)
    assert main(["train", str(bad)]) == 2
    assert "python -m toolkit train:" in capsys.readouterr().err
