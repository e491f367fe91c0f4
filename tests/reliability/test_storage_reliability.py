"""What is saved is never lost: folders are replaced whole, manifests are integrity checks, writers lock.

Every folder format the toolkit writes: SAE and crosscoder folders, checkpoints, activation caches, the converted
default model, the fine-tune, the feature store and steering specs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import toolkit.folders as folders_mod
import toolkit.io as io_mod
from toolkit.analysis.steering import SteeringSpec, VectorSteer
from toolkit.analysis.steering.files import load_spec, save_spec
from toolkit.config import CrosscoderConfig, SAEConfig
from toolkit.crosscoder import Crosscoder
from toolkit.errors import CacheError, CheckpointError, FolderLockedError
from toolkit.folders import TMP_PREFIX, lock_folder
from toolkit.io import MANIFEST
from toolkit.sae.sae import SAE
from toolkit.tracing import ActivationCache, fill_cache
from toolkit.training.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_temporaries(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(TMP_PREFIX)]


def edit_manifest(folder: Path, change) -> None:
    m = json.loads((folder / MANIFEST).read_text())
    change(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def sae(seed: int, d_sae: int = 16) -> SAE:
    return SAE.from_config(SAEConfig(d_in=8, d_sae=d_sae, architecture="topk", k=2), seed=seed)


def crosscoder(seed: int, d_sae: int = 16) -> Crosscoder:
    return Crosscoder(CrosscoderConfig(d_in=8, d_sae=d_sae, k=2), seed=seed)


MODULES = {"sae": (sae, SAE), "crosscoder": (crosscoder, Crosscoder)}


# ---------------------------------------------------------------- 1. replacing a saved folder is atomic


def failing_after(n_bytes: int):
    """A safetensors writer that writes `n_bytes` of the file, then fails like a full disk."""
    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save_file


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("fail", ["weights", "manifest"])
def test_a_save_that_fails_partway_leaves_the_old_folder_bit_identical(tmp_path, monkeypatch, kind, fail):
    make, cls = MODULES[kind]
    folder = make(0).save(tmp_path / kind)
    before = snapshot(folder)
    if fail == "weights":  # the tensor writer dies after 100 bytes (disk full)
        monkeypatch.setattr(io_mod, "save_file", failing_after(100))
    else:  # the 2nd file is written, then the manifest write fails
        monkeypatch.setattr(io_mod, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        make(1, d_sae=32).save(folder)
    monkeypatch.undo()
    assert snapshot(folder) == before and no_temporaries(tmp_path)
    loaded = cls.load(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), make(0).state_dict().values(), strict=True))


def test_a_real_write_limit_in_a_child_process_leaves_the_old_sae(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), like a full disk, without root."""
    folder = sae(0).save(tmp_path / "sae")
    before = snapshot(folder)
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from toolkit.config import SAEConfig
        from toolkit.sae.sae import SAE
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        big = SAE.from_config(SAEConfig(d_in=8, d_sae=4096, architecture="topk", k=2), seed=1)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        try:
            big.save({str(folder)!r})
        except OSError as e:
            print("failed:", e); sys.exit(3)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert snapshot(folder) == before and no_temporaries(tmp_path)
    assert SAE.load(folder).d_sae == 16


def test_a_crash_between_the_two_renames_is_recovered_by_the_loader(tmp_path, monkeypatch):
    folder = sae(0).save(tmp_path / "sae")
    before = snapshot(folder)
    monkeypatch.setattr(folders_mod, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # old set aside, new not yet in: the process dies here
            raise KeyboardInterrupt
        return real_rename(a, b)

    monkeypatch.setattr(folders_mod.os, "rename", rename)
    monkeypatch.setattr(folders_mod.shutil, "rmtree", lambda *a, **k: None)  # nothing is cleaned up after a kill
    with pytest.raises(KeyboardInterrupt):
        sae(1).save(folder)
    monkeypatch.undo()
    real_rename(folder, tmp_path / f"{TMP_PREFIX}sae.old-999-abc")  # what a kill right there leaves
    assert not folder.exists()
    assert SAE.load(folder).d_sae == 16 and snapshot(folder) == before


def test_saving_over_a_folder_keeps_other_files_there(tmp_path):
    folder = sae(0).save(tmp_path / "sae")
    (folder / "notes.txt").write_text("mine")
    sae(1).save(folder)
    assert (folder / "notes.txt").read_text() == "mine"


def test_re_saving_a_checkpoint_step_that_fails_keeps_the_old_one(tmp_path, monkeypatch):
    tensors = {"w": torch.arange(6.0)}
    save_checkpoint(tmp_path, 5, tensors, {"note": "old"})
    path = tmp_path / "checkpoints" / "step_00000005"
    before = snapshot(path)
    monkeypatch.setattr(io_mod, "save_file", failing_after(10))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 5, {"w": torch.zeros(6)}, {"note": "new"})
    monkeypatch.undo()
    assert snapshot(path) == before and load_checkpoint(path).state["note"] == "old"


def spec(value: float) -> SteeringSpec:
    return SteeringSpec([VectorSteer(torch.full((8,), value), "blocks.0.resid_post", "add", 1.0, name="v")])


def test_saving_a_steering_spec_over_another_that_fails_keeps_the_old_one(tmp_path, monkeypatch):
    folder = save_spec(spec(1.0), tmp_path / "spec")
    before = snapshot(folder)
    import toolkit.analysis.steering.files as files_mod

    monkeypatch.setattr(files_mod, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        save_spec(spec(2.0), folder)  # vectors written, the JSON fails
    monkeypatch.undo()
    assert snapshot(folder) == before and no_temporaries(tmp_path)
    assert torch.equal(load_spec(folder)["v"].vector, torch.full((8,), 1.0))


def test_a_feature_store_whose_final_write_fails_is_neither_half_written_nor_lost(tiny, tmp_path, monkeypatch):
    from toolkit.analysis import feature_store as fs_mod
    from toolkit.data import token_contexts

    model_sae = SAE.from_config(SAEConfig(d_in=tiny.d_model, d_sae=32, architecture="topk", k=4,
                                          site="blocks.0.resid_post"), seed=0)
    contexts = token_contexts(tiny.tokenizer, ["The cat sat on the mat. " * 30], 12, n_contexts=6)
    real, calls = fs_mod._save_npy, []

    def flaky(path, arr):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, arr)

    monkeypatch.setattr(fs_mod, "_save_npy", flaky)
    folder = tmp_path / "store"
    with pytest.raises(OSError):
        fs_mod.build_feature_store(tiny, model_sae, contexts, folder, progress=False)
    monkeypatch.undo()
    with pytest.raises(CacheError, match="no complete feature store"):
        fs_mod.FeatureStore.open(folder)
    assert no_temporaries(tmp_path)
    store = fs_mod.build_feature_store(tiny, model_sae, contexts, folder, progress=False)
    assert store.n_latents == 32


# ---------------------------------------------------------------- 4. manifests are integrity checks


def outside(m):
    m["files"]["../escape.txt"] = {"bytes": 1, "sha256": "0" * 64}


def absolute(m):
    m["files"]["/etc/hostname"] = {"bytes": 1, "sha256": "0" * 64}


def unlisted(name):
    def change(m):
        del m["files"][name]
    return change


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("change,match", [(outside, "not a path inside"), (absolute, "not a path inside"),
                                          (unlisted("cfg.json"), r"does not list \['cfg.json'\]")])
def test_weight_folder_manifests_are_refused_when_they_escape_or_omit(tmp_path, kind, change, match):
    make, cls = MODULES[kind]
    folder = make(0).save(tmp_path / kind)
    (tmp_path / "escape.txt").write_text("x")
    edit_manifest(folder, change)
    with pytest.raises(CheckpointError, match=match):
        cls.load(folder)


@pytest.mark.parametrize("change,match", [(outside, "not a path inside"), (unlisted("state.json"), "does not list")])
def test_checkpoint_manifests_are_refused_when_they_escape_or_omit(tmp_path, change, match):
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})
    edit_manifest(path, change)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


class FakeModel:
    name, d_model = "fake", 4

    def site(self, s):
        from toolkit.sites import Site
        return Site.parse(s)

    def site_width(self, s):
        return 4


def fake_capture(model, contexts, sites, *, batch_size, attention_mask, progress, desc, start):
    for offset in range(start, contexts.shape[0], batch_size):
        b = min(batch_size, contexts.shape[0] - offset)
        yield offset, {s.name: torch.ones(b, contexts.shape[1], 4) * offset for s in sites}


def small_cache(folder: Path) -> ActivationCache:
    contexts = torch.randint(3, 50, (4, 5))
    return fill_cache(FakeModel(), "blocks.0.resid_post", contexts, folder, batch_size=2, shard_contexts=2,
                      progress=False, capture_fn=fake_capture)


@pytest.mark.parametrize("change,match", [(outside, "not a path inside"), (unlisted("cache.json"), "does not list")])
def test_activation_cache_manifests_are_refused_when_they_escape_or_omit(tmp_path, change, match):
    folder = small_cache(tmp_path / "cache").folder
    assert "cache.json" in json.loads((folder / MANIFEST).read_text())["files"]
    edit_manifest(folder, change)
    with pytest.raises(CacheError, match=match):
        ActivationCache.open(folder)


def test_an_activation_cache_whose_config_was_changed_is_refused(tmp_path):
    folder = small_cache(tmp_path / "cache").folder
    cfg = json.loads((folder / "cache.json").read_text())
    (folder / "cache.json").write_text(json.dumps({**cfg, "model": "other"}))
    with pytest.raises(CacheError, match="cache.json"):
        ActivationCache.open(folder, verify=False)


@pytest.mark.parametrize("change,match", [(outside, "not a path inside"), (unlisted("spec.json"), "does not list")])
def test_steering_spec_manifests_are_refused_when_they_escape_or_omit(tmp_path, change, match):
    folder = save_spec(spec(1.0), tmp_path / "spec")
    edit_manifest(folder, change)
    with pytest.raises(CheckpointError, match=match):
        load_spec(folder)


def test_a_steering_spec_whose_vectors_were_swapped_is_refused(tmp_path):
    a, b = save_spec(spec(1.0), tmp_path / "a"), save_spec(spec(2.0), tmp_path / "b")
    (a / "vectors.safetensors").write_bytes((b / "vectors.safetensors").read_bytes())
    (a / "vectors.safetensors").write_bytes((b / "vectors.safetensors").read_bytes() + b"")
    with pytest.raises(CheckpointError, match="vectors.safetensors: sha256"):
        load_spec(a)


# ---------------------------------------------------------------- 5. one writer per folder


HOLD = textwrap.dedent("""
    import sys, time
    from toolkit.folders import lock_folder
    lock = lock_folder(sys.argv[1])
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_process_writing_the_same_folder_gets_a_clear_error(tmp_path):
    folder = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError, match=rf"{folder}.*pid {holder.pid} on host .*running '-c {folder}'"):
            small_cache(folder)
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):
            sae(0).save(folder)
        assert not folder.exists() or not any(folder.iterdir())  # nothing was written or deleted
    finally:
        holder.kill()
        holder.wait()
    assert small_cache(folder).complete  # the lock died with its holder


def test_a_trainer_and_a_cache_writer_on_one_folder_in_one_process(tmp_path):
    from toolkit.config import TrainConfig
    from toolkit.training.sae_trainer import train_sae

    folder = tmp_path / "shared"
    cache = ActivationCache.create(folder, small_cache(tmp_path / "c").cfg)  # a writer holding the folder
    pulled = []

    def source(start):
        while True:
            pulled.append(start)
            yield torch.randn(16, 4)

    cfg = TrainConfig(SAEConfig(4, 8, "topk", k=2), batch_size=16, total_steps=2)
    with pytest.raises(FolderLockedError, match=f"{folder}.*pid {os.getpid()}"):
        train_sae(cfg, source, out_dir=folder, progress=False)
    assert pulled == []  # refused before any work
    with pytest.raises(FolderLockedError):
        ActivationCache.create(folder, cache.cfg, resume=True)
    cache.close()
    with lock_folder(folder):
        pass
