"""The converted default model is verified, cache keys cover every setting, bad paths fail before any work."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import toolkit.convert as convert_mod
from toolkit.config import SAEConfig
from toolkit.convert import DEFAULT_MODEL_DIRNAME, check_model_folder, quick_fingerprint, write_model_manifest
from toolkit.errors import CacheError, CheckpointError, DeviceUnavailableError, ModelUnavailableError
from toolkit.io import MANIFEST
from toolkit.models import load_model
from toolkit.sae.sae import SAE
from toolkit.training.zoo import CorpusSpec, corpus_activations, default_train_config, sae_folder, trained_sae

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- 2. the converted default model is verified


@pytest.fixture
def fake_default(tiny, tmp_path, monkeypatch) -> Path:
    """A converted-model folder made from the tiny model by the converter's own manifest writer."""
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / DEFAULT_MODEL_DIRNAME
    tiny.hf.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    write_model_manifest(folder, extra={"source": "tiny", "dtype": "float32"})
    return folder


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_the_default_model_loads_when_intact(fake_default):
    model = load_model("default", device="cpu")
    assert model.name == "default" and model.extra["weights_sha256"]


def test_flipped_bytes_in_a_shard_are_caught_on_load(fake_default):
    weights = fake_default / "model.safetensors"
    size = weights.stat().st_size
    flip(weights, (size - (1 << 16)) * 7 // 15 + 100)  # inside one of the blocks every load reads
    with pytest.raises(CheckpointError, match=rf"{fake_default} is damaged: model.safetensors.*prepare --repair"):
        load_model("default", device="cpu")


def test_a_truncated_shard_is_a_clear_error_not_a_safetensors_one(fake_default):
    weights = fake_default / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors is .* bytes, the manifest says .*truncated.*prepare"):
        load_model("default", device="cpu")


def test_prepare_verifies_every_byte_and_repairs(fake_default, monkeypatch, capsys):
    from toolkit.__main__ import main

    monkeypatch.setattr(convert_mod, "_QUICK_BLOCK", 256)  # the tiny shard is smaller than 16 blocks of 64 KiB
    write_model_manifest(fake_default)
    weights = fake_default / "model.safetensors"
    good = weights.read_bytes()
    flip(weights, (weights.stat().st_size - 256) * 7 // 15 + 300)  # between two sampled blocks
    check_model_folder(fake_default)  # the cheap check cannot see it ...
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        check_model_folder(fake_default, full=True)  # ... the full one can

    def reconvert(folder, progress):  # stands in for the GGUF conversion (minutes on the real model)
        tmp = folder.parent / "rebuilt"
        shutil.copytree(folder, tmp)
        (tmp / "model.safetensors").write_bytes(good)
        convert_mod.swap_in(tmp, folder)

    monkeypatch.setattr(convert_mod, "_convert_default", reconvert)
    assert main(["prepare"]) == 0
    out = capsys.readouterr().out
    assert "damaged" in out and "(repaired in" in out
    check_model_folder(fake_default, full=True)
    assert main(["prepare"]) == 0 and "already prepared; every file's sha256 verified" in capsys.readouterr().out
    assert main(["prepare", "--repair"]) == 0 and "(repaired in" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["unlisted", "outside"])
def test_a_converted_model_manifest_must_list_every_file_inside_it(fake_default, change):
    if change == "unlisted":
        (fake_default / "extra.safetensors").write_bytes(b"\0" * 16)
        match = r"does not list \['extra.safetensors'\]"
    else:
        m = json.loads((fake_default / MANIFEST).read_text())
        m["files"]["../../x"] = {"bytes": 1, "sha256": "0" * 64, "quick": ""}
        (fake_default / MANIFEST).write_text(json.dumps(m))
        match = "not a path inside"
    with pytest.raises(CheckpointError, match=match):
        load_model("default", device="cpu")


def test_older_manifests_are_verified_in_full_once_then_get_fingerprints(fake_default):
    m = json.loads((fake_default / MANIFEST).read_text())
    for e in m["files"].values():
        del e["quick"]
    (fake_default / MANIFEST).write_text(json.dumps(m))
    convert_mod.prepare_default_model(progress=False)
    m = json.loads((fake_default / MANIFEST).read_text())
    assert all(e["quick"] == quick_fingerprint(fake_default / n) for n, e in m["files"].items())


REAL_DEFAULT = Path.home() / ".cache" / "gemma-interp-toolkit" / DEFAULT_MODEL_DIRNAME


@pytest.mark.skipif(not (REAL_DEFAULT / MANIFEST).is_file(), reason="the real default model is not prepared here")
def test_the_real_default_model_copy_verifies_and_a_flipped_byte_is_caught(tmp_path, monkeypatch):
    copy_dir = tmp_path / "cache" / DEFAULT_MODEL_DIRNAME
    shutil.copytree(REAL_DEFAULT, copy_dir)  # never touch the user's cache in place
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert convert_mod.prepare_default_model(progress=False, verify=True) == copy_dir
    shard = sorted(copy_dir.glob("model-*.safetensors"))[0]
    flip(shard, 1 << 20)
    with pytest.raises(CheckpointError, match="sha256 does not match.*prepare"):
        check_model_folder(copy_dir, full=True)


# ---------------------------------------------------------------- 3. cache keys cover every setting


def test_trained_saes_are_keyed_by_every_training_setting(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    spec = CorpusSpec(source=str(Path(__file__)), ctx_len=16, n_contexts=8)
    kw = dict(d_in=tiny.d_model, d_sae=32, k=4, steps=3, batch_size=32)
    base = default_train_config("blocks.0.resid_post", **kw)
    folders = {sae_folder(tiny, default_train_config("blocks.0.resid_post", **kw, **o), spec)
               for o in ({}, {"lr": 5e-4}, {"seed": 1}, {"warmup_steps": 1}, {"aux_k_coefficient": 0.1})}
    assert len(folders) == 5
    assert sae_folder(tiny, base, spec) == sae_folder(tiny, default_train_config("blocks.0.resid_post", **kw), spec)

    args = dict(d_sae=32, k=4, steps=3, corpus=spec, progress=False, batch_size=32)
    a = trained_sae(tiny, "blocks.0.resid_post", **args)
    b = trained_sae(tiny, "blocks.0.resid_post", **args, lr=5e-3)
    c = trained_sae(tiny, "blocks.0.resid_post", **args, seed=7)
    assert not torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_enc, c.W_enc)
    again = trained_sae(tiny, "blocks.0.resid_post", **args, lr=5e-3)
    assert torch.equal(again.W_enc, b.W_enc)


def perturbed(model):
    """The same model name with other weights (as a re-trained or edited model would be)."""
    from toolkit.models import _wrap

    hf = copy.deepcopy(model.hf)
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    return _wrap(hf, model.tokenizer, model.name)


def test_activation_caches_are_keyed_by_storage_dtype_and_model_weights(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    spec = CorpusSpec(source=str(Path(__file__)), ctx_len=16, n_contexts=4)
    f32 = corpus_activations(tiny, "blocks.1.resid_post", spec, progress=False)
    bf16 = corpus_activations(tiny, "blocks.1.resid_post", spec, progress=False, dtype=torch.bfloat16)
    assert bf16.folder != f32.folder and bf16.cfg.dtype == "bfloat16" and f32.cfg.dtype == "float32"
    other = corpus_activations(perturbed(tiny), "blocks.1.resid_post", spec, progress=False)
    assert other.folder != f32.folder and not torch.equal(other.shard(0)["blocks.1.resid_post"],
                                                          f32.shard(0)["blocks.1.resid_post"])
    assert corpus_activations(tiny, "blocks.1.resid_post", spec, progress=False).folder == f32.folder


def test_a_feature_store_is_not_reused_for_an_sae_with_other_encoder_weights(tiny, tmp_path):
    from toolkit.analysis.feature_store import build_feature_store
    from toolkit.data import token_contexts

    cfg = SAEConfig(d_in=tiny.d_model, d_sae=16, architecture="topk", k=4, site="blocks.0.resid_post")
    first = SAE.from_config(cfg, seed=0)
    contexts = token_contexts(tiny.tokenizer, ["The cat sat on the mat. " * 30], 12, n_contexts=4)
    build_feature_store(tiny, first, contexts, tmp_path / "store", progress=False)
    second = SAE.from_config(cfg, seed=0)
    with torch.no_grad():
        second.b_enc.add_(1.0)  # same decoder, other codes
    with pytest.raises(CacheError, match="other settings, tokens, SAE weights or model weights"):
        build_feature_store(tiny, second, contexts, tmp_path / "store", progress=False)
    with pytest.raises(CacheError, match="model weights"):
        build_feature_store(perturbed(tiny), first, contexts, tmp_path / "store", progress=False)


def test_feature_stores_in_the_cache_are_keyed_by_everything_they_depend_on(tiny, tmp_path, monkeypatch):
    from toolkit.analysis.feature_store import build_feature_store
    from toolkit.data import token_contexts

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    cfg = SAEConfig(d_in=tiny.d_model, d_sae=16, architecture="topk", k=4, site="blocks.0.resid_post")
    contexts = token_contexts(tiny.tokenizer, ["The cat sat on the mat. " * 30], 12, n_contexts=4)
    a = build_feature_store(tiny, SAE.from_config(cfg, seed=0), contexts, progress=False)
    b = build_feature_store(tiny, SAE.from_config(cfg, seed=1), contexts, progress=False)
    again = build_feature_store(tiny, SAE.from_config(cfg, seed=0), contexts, progress=False)
    assert a.folder != b.folder and again.folder == a.folder and a.folder.parent == tmp_path / "feature_stores"


def test_fine_tunes_of_two_bases_with_one_name_get_two_folders(tiny, tmp_path, monkeypatch):
    from toolkit.finetune import FinetuneConfig, prepare_finetuned

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    cfg = FinetuneConfig(layers=(1,), steps=2, batch_size=2, ctx_len=16, save_dtype="float32")
    texts = ["Plain words in a row. Another sentence here. " * 20] * 4
    a = prepare_finetuned("pirate", cfg=cfg, base=tiny, texts=texts, progress=False)
    b = prepare_finetuned("pirate", cfg=cfg, base=perturbed(tiny), texts=texts, progress=False)
    assert a != b and a.exists() and b.exists()


# ---------------------------------------------------------------- 6. paths, devices and the hub


def test_a_cache_dir_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch, tiny):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(CacheError, match=r"file is a file, not a folder; remove the file or set TOOLKIT_CACHE_DIR"):
        corpus_activations(tiny, "blocks.0.resid_post", CorpusSpec(source=str(Path(__file__)), n_contexts=2),
                           progress=False)
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "file" / "sub"))
    with pytest.raises(CacheError, match="is a file"):
        load_model("default")


def test_an_output_dir_that_is_a_file_is_refused_before_training(tmp_path):
    from toolkit.config import TrainConfig
    from toolkit.training.sae_trainer import train_sae

    (tmp_path / "out").write_text("x")
    pulled = []

    def source(start):
        while True:
            pulled.append(start)
            yield torch.randn(16, 4)

    cfg = TrainConfig(SAEConfig(4, 8, "topk", k=2), batch_size=16, total_steps=2)
    with pytest.raises(CheckpointError, match=r"training output folder .*out is a file, not a folder"):
        train_sae(cfg, source, out_dir=tmp_path / "out", progress=False)
    assert pulled == []
    with pytest.raises(CheckpointError, match="is a file"):
        SAE.from_config(SAEConfig(4, 8, "topk", k=2)).save(tmp_path / "out" / "sae")


def test_a_local_model_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(ModelUnavailableError, match=r"not a model folder \(no config.json\)"):
        load_model(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_loading_onto_a_missing_cuda_device_says_so(tmp_path):
    folder = SAE.from_config(SAEConfig(4, 8, "topk", k=2)).save(tmp_path / "sae")
    with pytest.raises(DeviceUnavailableError, match="'cuda' asked for, but this machine has no CUDA"):
        SAE.load(folder, device="cuda")
    with pytest.raises(DeviceUnavailableError, match="unknown device 'cdua'"):
        SAE.load(folder, device="cdua")
    with pytest.raises(DeviceUnavailableError):
        load_model(str(tmp_path), device="cuda")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"TRANSFORMERS_OFFLINE": "1"},
                                 {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_a_hub_id_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch, env):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"offline \(.*\) and not in the Hugging Face cache.*HF_TOKEN"):
        load_model("google/gemma-2-2b")
    assert time.perf_counter() - t < 5.0  # this test is about the timeout: the old code retried for ~23 s
