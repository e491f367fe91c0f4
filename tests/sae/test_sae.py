"""The SAE module: config checks, architecture semantics against hand-written references, files, reliability."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from toolkit.config import SAE_ARCHITECTURES, SAEConfig
from toolkit.errors import CheckpointError, FeatureIndexError, HookNotFoundError, ShapeMismatchError
from toolkit.io import write_manifest
from toolkit.sae import ARCHITECTURES, SAE, Architecture, SAEOutput, SparseCodes, register
from toolkit.sites import Site, validate_site

D_IN, D_SAE, K = 16, 48, 5
CONFIGS = {
    "relu": SAEConfig(D_IN, D_SAE, "relu"),
    "jumprelu": SAEConfig(D_IN, D_SAE, "jumprelu", apply_b_dec_to_input=False),
    "topk": SAEConfig(D_IN, D_SAE, "topk", k=K),
    "batchtopk": SAEConfig(D_IN, D_SAE, "batchtopk", k=K),
    "matryoshka": SAEConfig(D_IN, D_SAE, "matryoshka", k=K, matryoshka_groups=(8, 24, D_SAE)),
}


def random_sae(arch: str, seed: int = 0, **overrides) -> SAE:
    """An SAE with random (not unit-norm) weights and nonzero biases, thresholds and input_scale."""
    cfg = dataclasses.replace(CONFIGS[arch], **overrides)
    sae = SAE.from_config(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for p in (sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.5)
        sae.input_scale.fill_(1.5)
    return sae


def np_pre(sae: SAE, x: torch.Tensor) -> np.ndarray:
    p = {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}
    xs = x.double().numpy() * p["input_scale"]
    if sae.cfg.apply_b_dec_to_input:
        xs = xs - p["b_dec"]
    return xs @ p["W_enc"] + p["b_enc"]


def np_decode(sae: SAE, codes: np.ndarray) -> np.ndarray:
    p = {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}
    return (codes @ p["W_dec"] + p["b_dec"]) / p["input_scale"]


def np_topk(a: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(a)
    idx = np.argsort(-a, axis=-1)[..., :k]
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(a, idx, -1), 0), -1)
    return out


def close(t: torch.Tensor, a: np.ndarray, atol: float = 1e-5) -> bool:
    return np.allclose(t.detach().double().numpy(), a, atol=atol, rtol=1e-5)


X = torch.randn(2, 10, D_IN, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------- config


def test_config_round_trip_and_unknown_keys():
    cfg = CONFIGS["matryoshka"]
    assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown SAEConfig key\(s\) \['topk'\]; valid keys: d_in, d_sae"):
        SAEConfig.from_dict({**CONFIGS["topk"].to_dict(), "topk": 3})
    with pytest.raises(ValueError, match=r"needs key\(s\) \['d_sae'\]"):
        SAEConfig.from_dict({"d_in": 4, "architecture": "relu"})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"architecture": "gated"}, "unknown SAE architecture 'gated'; valid: jumprelu, relu, topk, batchtopk, matryoshka"),
    ({"architecture": "topk"}, "needs k"),
    ({"architecture": "relu", "k": 3}, "k is only used by top-k"),
    ({"architecture": "topk", "k": 99}, "larger than d_sae"),
    ({"architecture": "matryoshka", "k": 2}, "needs matryoshka_groups"),
    ({"architecture": "matryoshka", "k": 2, "matryoshka_groups": (8, 4, 48)}, "increase strictly"),
    ({"architecture": "matryoshka", "k": 2, "matryoshka_groups": (8, 40)}, "end at d_sae=48"),
    ({"architecture": "relu", "matryoshka_groups": (48,)}, "only used by 'matryoshka'"),
    ({"architecture": "relu", "dtype": "float8"}, "dtype must be one of"),
    ({"architecture": "relu", "d_in": 0}, "d_in must be a positive integer"),
    ({"architecture": "relu", "site": "blocks.3.resid_sideways"}, "unknown site kind"),
])
def test_config_cross_field_checks(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SAEConfig(**{"d_in": D_IN, "d_sae": D_SAE, **kwargs})


def test_config_site_is_canonical():
    assert SAEConfig(4, 8, "relu", site="blocks.6.hook_resid_post").site == "blocks.6.resid_post"


def test_registry_refuses_duplicates_and_agrees_with_config():
    class Again(Architecture):
        name = "topk"

    with pytest.raises(ValueError, match="'topk' is already registered"):
        register(Again())
    assert list(ARCHITECTURES) == list(SAE_ARCHITECTURES) == ["jumprelu", "relu", "topk", "batchtopk", "matryoshka",
                                                              "hierarchical_topk", "adaptivek"]
    for name, arch in ARCHITECTURES.items():
        assert SAE_ARCHITECTURES[name] == (("k",) * arch.needs_k + ("matryoshka_groups",) * arch.has_groups
                                           + arch.extra_fields)

    class Squared(Architecture):
        name, needs_k = "squared_topk", True

        def activate(self, sae, pre):
            return ARCHITECTURES["topk"].activate(sae, pre) ** 2

    try:
        register(Squared())
        sae = SAE.from_config(SAEConfig(D_IN, D_SAE, "squared_topk", k=2))
        assert ((sae.encode(X) != 0).sum(-1) <= 2).all()
        with pytest.raises(ValueError, match="'squared_topk' needs k"):
            SAEConfig(D_IN, D_SAE, "squared_topk")
    finally:
        ARCHITECTURES.pop("squared_topk", None)
        SAE_ARCHITECTURES.pop("squared_topk", None)


# ---------------------------------------------------------------- init


def test_from_config_init():
    sae = SAE.from_config(CONFIGS["jumprelu"], seed=3)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert torch.equal(SAE.from_config(CONFIGS["jumprelu"], seed=3).W_dec, sae.W_dec)
    assert not sae.training and float(sae.input_scale) == 1.0
    assert float(SAE.from_config(CONFIGS["batchtopk"]).threshold) == -1.0  # not estimated yet
    assert (sae.d_in, sae.d_sae, sae.cfg) == (D_IN, D_SAE, CONFIGS["jumprelu"])


# ---------------------------------------------------------------- semantics per architecture


def test_relu_semantics():
    sae = random_sae("relu")
    assert close(sae.encode(X), np.maximum(np_pre(sae, X), 0))


def test_jumprelu_threshold():
    sae = random_sae("jumprelu")
    pre = np_pre(sae, X)
    thr = sae.threshold.detach().double().numpy()
    codes = sae.encode(X)
    assert close(codes, np.where(pre > thr, np.maximum(pre, 0), 0))
    # exactly at the threshold is off; just above is on
    with torch.no_grad():
        at = sae(X[0, 0]).pre_activations.abs()  # float32, exactly what encode compares
        sae.threshold.copy_(at)
        assert not sae.encode(X[0, 0]).any()
        sae.threshold.copy_(torch.nextafter(at, torch.zeros_like(at)))
        assert (sae.encode(X[0, 0]) != 0).sum() == (sae(X[0, 0]).pre_activations > 0).sum()


def test_topk_exactly_k():
    sae = random_sae("topk")
    with torch.no_grad():
        sae.b_enc.add_(10.0)  # all pre-activations positive, so the relu never removes one of the k
    codes = sae.encode(X)
    assert ((codes != 0).sum(-1) == K).all()
    assert close(codes, np_topk(np_pre(sae, X), K))


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_training_and_inference(arch):
    sae = random_sae(arch)
    pre = np_pre(sae, X).reshape(-1, D_SAE)
    acts = np.maximum(pre, 0)
    # training mode: the k * n_tokens largest relu'd pre-activations of the whole batch
    sae.train()
    codes = sae.encode(X).reshape(-1, D_SAE)
    assert int((codes != 0).sum()) == K * 20
    cut = np.sort(acts.ravel())[-K * 20]
    assert close(codes, np.where(acts >= cut, acts, 0))
    assert torch.equal(sae(X).codes.reshape(-1, D_SAE), codes)
    # inference before the threshold is estimated: per-token top-k
    sae.eval()
    assert close(sae.encode(X).reshape(-1, D_SAE), np_topk(pre, K))
    # inference with the estimated scalar threshold: a JumpReLU with one threshold
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    assert close(sae.encode(X).reshape(-1, D_SAE), np.where(pre > 0.3, acts, 0))
    assert torch.equal(sae(X).codes, sae.encode(X))


def test_matryoshka_prefix_decode():
    sae = random_sae("matryoshka")
    codes = sae.encode(X).detach()
    c = codes.double().numpy()
    for w in sae.cfg.matryoshka_groups:
        want = np_decode(sae, np.concatenate([c[..., :w], np.zeros_like(c[..., w:])], -1))
        assert close(sae.decode(codes, width=w), want)
    assert torch.equal(sae.decode(codes, width=D_SAE), sae.decode(codes))
    for bad in (0, D_SAE + 1, 2.5, True):
        with pytest.raises(ValueError, match=f"width must be an integer in 1..{D_SAE}"):
            sae.decode(codes, width=bad)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_forward_sparse_and_dense_paths_agree(arch):
    sae = random_sae(arch)
    out = sae(X)
    assert isinstance(out, SAEOutput)
    assert out.codes.shape == (2, 10, D_SAE) and out.reconstruction.shape == X.shape
    assert torch.allclose(out.codes, sae.encode(X), atol=1e-6)
    assert close(out.pre_activations, np_pre(sae, X))
    assert close(out.reconstruction, np_decode(sae, out.codes.detach().double().numpy()))
    sparse = sae.encode_sparse(X)
    assert isinstance(sparse, SparseCodes) and sparse.indices.shape[:-1] == (2, 10)
    dense = torch.zeros(2, 10, D_SAE).scatter_add_(-1, sparse.indices, sparse.values)
    assert torch.allclose(dense, out.codes, atol=1e-6)
    assert torch.allclose(sae.decode_sparse(sparse), out.reconstruction, atol=1e-5)
    assert sae.encode(X[0, 0]).shape == (D_SAE,)  # a single vector works too


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_empty_batches_give_empty_results_of_the_right_shape(arch):
    sae = random_sae(arch)
    for lead in [(0,), (2, 0)]:
        x = torch.zeros(*lead, sae.d_in)
        sparse = sae.encode_sparse(x)
        kmax = sae.cfg.k if arch == "topk" else 1
        assert sparse.indices.shape == sparse.values.shape == (*lead, kmax)
        assert sparse.indices.dtype == torch.int64 and sparse.values.dtype == sae.dtype
        assert sae.decode_sparse(sparse).shape == (*lead, sae.d_in)
        assert sae.encode(x).shape == (*lead, sae.d_sae) and sae(x).reconstruction.shape == x.shape


def test_decode_sparse_is_differentiable_and_checked():
    sae = random_sae("topk")
    idx, val = sae.encode_sparse(X)
    val = val.detach().requires_grad_(True)
    sae.decode_sparse(SparseCodes(idx, val)).sum().backward()
    assert val.grad is not None and sae.W_dec.grad is not None
    with pytest.raises(FeatureIndexError, match=f"valid latents are 0..{D_SAE - 1}"):
        sae.decode_sparse((idx + D_SAE, val))
    with pytest.raises(TypeError, match="integer"):
        sae.decode_sparse((idx.float(), val))


def test_b_dec_and_input_scale():
    sae = random_sae("relu")
    without = random_sae("relu", apply_b_dec_to_input=False)
    assert not torch.allclose(sae.encode(X), without.encode(X))
    assert close(without.encode(X), np.maximum(np_pre(without, X), 0))
    with torch.no_grad():
        sae.input_scale.fill_(1.0)
    codes = sae.encode(X)
    with torch.no_grad():
        sae.input_scale.fill_(2.0)
    assert torch.allclose(sae.encode(X / 2), codes, atol=1e-6)
    assert torch.allclose(sae.decode(codes) * 2, random_sae("relu").decode(codes) * 1.5, atol=1e-5)


# ---------------------------------------------------------------- reliability 1, 3, 6


class TinyModel:
    """Duck-typed stand-in for toolkit.models.Model: 2 layers, d_model 64, d_mlp 128, 4 heads x 16."""

    name = "tiny-gemma2"

    def site(self, name):
        return validate_site(name, 2)

    def site_width(self, site: Site) -> int:
        return {"mlp_post": 128}.get(site.kind, 64)


def test_reliability_1_width_mismatch_names_everything():
    sae = SAE.from_config(SAEConfig(128, 256, "relu", site="blocks.0.mlp_post", model="tiny-gemma2"))
    assert sae.check_compatible(TinyModel(), "blocks.0.mlp_post") == Site("mlp_post", 0)
    assert sae.check_compatible(TinyModel(), "blocks.1.mlp_post", allow_other_site=True) == Site("mlp_post", 1)
    with pytest.raises(ShapeMismatchError) as e:
        sae.check_compatible(TinyModel(), "blocks.1.resid_post")
    msg = str(e.value)
    for part in ("SAE(relu, d_in=128, d_sae=256", "blocks.1.resid_post", "tiny-gemma2", "128-wide", "is 64 wide"):
        assert part in msg
    with pytest.raises(HookNotFoundError, match="layers 0..1"):
        sae.check_compatible(TinyModel(), "blocks.5.mlp_post")


def test_reliability_3_dtype_and_device():
    sae = random_sae("jumprelu")
    assert sae.encode(X.to(torch.bfloat16)).dtype == torch.float32  # floating inputs are cast
    assert torch.equal(sae.encode(X.to(torch.bfloat16)), sae.encode(X.to(torch.bfloat16).float()))
    with pytest.raises(TypeError, match=r"must be floating point \(cast to torch.float32\); got torch.int64"):
        sae.encode(X.long())
    with pytest.raises(TypeError, match="activations are on meta but the SAE is on cpu"):
        sae.encode(X.to("meta"))
    with pytest.raises(TypeError, match="codes are on meta but the SAE is on cpu"):
        sae.decode(torch.zeros(3, D_SAE, device="meta"))
    with pytest.raises(TypeError, match="must be a torch.Tensor, got ndarray"):
        sae.encode(X.numpy())
    with pytest.raises(ShapeMismatchError, match=f"the last dimension must be {D_IN}"):
        sae.encode(torch.zeros(3, D_IN + 1))
    half = random_sae("jumprelu").to(torch.bfloat16)
    assert half.cfg.dtype == "bfloat16" and half.encode(X).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [-1, D_SAE, 1.5, "3", True, None])
def test_reliability_6_feature_index(bad):
    sae = random_sae("relu")
    with pytest.raises(FeatureIndexError, match=f"0..{D_SAE - 1}"):
        sae.check_feature(bad)


def test_feature_index_accepts_integers():
    sae = random_sae("relu")
    assert sae.check_feature(np.int64(3)) == 3 and sae.check_feature(torch.tensor(D_SAE - 1)) == D_SAE - 1


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_save_load_bit_exact(arch, tmp_path):
    sae = random_sae(arch, model="google/gemma-2-2b", site="blocks.3.resid_post")
    if arch in ("batchtopk", "matryoshka"):
        with torch.no_grad():
            sae.threshold.fill_(0.25)
    sae.save(tmp_path / "sae")
    back = SAE.load(tmp_path / "sae")
    assert back.cfg == sae.cfg and not back.training
    assert back.state_dict().keys() == sae.state_dict().keys()
    for k, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert torch.equal(back.encode(X), sae.encode(X))


def test_save_load_bfloat16(tmp_path):
    sae = random_sae("topk").to(torch.bfloat16)
    sae.save(tmp_path / "s")
    back = SAE.load(tmp_path / "s")
    assert back.dtype == torch.bfloat16 and back.cfg.dtype == "bfloat16"
    assert torch.equal(back.W_enc, sae.W_enc)


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "sae"
    random_sae("jumprelu").save(folder)
    return folder


def rewrite_cfg(folder, change):
    cfg = json.loads((folder / "cfg.json").read_text())
    change(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    write_manifest(folder, ["weights.safetensors", "cfg.json"])


def test_truncated_weights(saved):
    w = saved / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"weights.safetensors: \d+ bytes, manifest says \d+"):
        SAE.load(saved)
    write_manifest(saved, ["weights.safetensors", "cfg.json"])  # even with a matching manifest
    with pytest.raises(CheckpointError, match="weights.safetensors: cannot read weights"):
        SAE.load(saved)


def test_wrong_sha256(saved):
    m = json.loads((saved / "manifest.json").read_text())
    m["files"]["weights.safetensors"]["sha256"] = "0" * 64
    (saved / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="weights.safetensors: sha256 .* does not match"):
        SAE.load(saved)


def test_missing_cfg(saved):
    (saved / "cfg.json").unlink()
    with pytest.raises(CheckpointError, match="cfg.json: listed in the manifest but missing"):
        SAE.load(saved)


def test_cfg_unknown_and_missing_keys(saved):
    rewrite_cfg(saved, lambda c: c.update(treshold=0.1))
    with pytest.raises(CheckpointError, match=r"cfg.json: unknown SAEConfig key\(s\) \['treshold'\]; valid keys"):
        SAE.load(saved)
    rewrite_cfg(saved, lambda c: (c.pop("treshold"), c.pop("d_sae")))
    with pytest.raises(CheckpointError, match=r"cfg.json: SAEConfig needs key\(s\) \['d_sae'\]"):
        SAE.load(saved)


def test_cfg_shape_disagrees_with_weights(saved):
    rewrite_cfg(saved, lambda c: c.update(d_sae=D_SAE + 1))
    with pytest.raises(CheckpointError, match=r"weights.safetensors: W_enc has shape \(16, 48\), expected \(16, 49\)"):
        SAE.load(saved)
    rewrite_cfg(saved, lambda c: c.update(d_sae=D_SAE, architecture="relu"))
    with pytest.raises(CheckpointError, match=r"unexpected \['threshold'\]"):
        SAE.load(saved)


def test_non_finite_weights(tmp_path):
    sae = random_sae("relu")
    with torch.no_grad():
        sae.W_dec[0, :3] = float("nan")
    sae.save(tmp_path / "s")
    with pytest.raises(CheckpointError, match=r"weights.safetensors: W_dec has 3 non-finite"):
        SAE.load(tmp_path / "s")


def test_load_points_to_the_right_loader(tmp_path):
    (tmp_path / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no manifest.json, but sae_weights.safetensors is there; load it with SAE.from_saelens"):
        SAE.load(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        SAE.load(tmp_path / "nope")

