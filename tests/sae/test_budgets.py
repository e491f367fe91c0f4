"""HierarchicalTopK and AdaptiveK as SAEs: k per call and per input, errors for bad budgets and probes, save/load,
with_k for splicing and metrics, and the AdaptiveK reference implementation's files (hiyukie/adaptiveK)."""

from __future__ import annotations

import json

import pytest
import torch

from toolkit.config import SAEConfig
from toolkit.errors import ArgumentError, CheckpointError, ShapeMismatchError
from toolkit.sae import SAE
from toolkit.sae.budgets import budget_from_complexity
from toolkit.sae.metrics import reconstruction_metrics
from toolkit.sae.splice import run_with_sae

D, W, K = 16, 64, 8


def make(arch: str, seed: int = 0, **kw) -> SAE:
    extra = {"k_min": 2} if arch == "adaptivek" else {}
    sae = SAE.from_config(SAEConfig(D, W, arch, k=K, **extra, **kw), seed=seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(W) * 0.1)
    return sae


def l0(codes: torch.Tensor) -> torch.Tensor:
    return (codes != 0).sum(-1)


@pytest.mark.parametrize("arch", ["hierarchical_topk", "adaptivek", "topk"])
def test_k_per_call_and_per_input_keeps_the_largest_latents(arch):
    sae = make(arch)
    x = torch.randn(4, 5, D)
    full = sae.encode(x, k=K)
    assert full.shape == (4, 5, W) and (l0(full) == K).all()
    for k in (1, 3, K):
        codes = sae.encode(x, k=k)
        assert (l0(codes) == k).all()
        # the k kept are the k largest of the K-budget codes: truncation, not another selection
        top = full.topk(k, dim=-1).values.sort(-1).values
        assert torch.equal(codes[codes != 0].view(4, 5, k).sort(-1).values, top)
        assert torch.equal(sae(x, k=k).codes, codes)
        sp = sae.encode_sparse(x, k=k)
        torch.testing.assert_close(sae.decode_sparse(sp), sae.decode(codes))
    per = torch.randint(1, K + 1, (4, 5))
    codes = sae.encode(x, k=per)
    assert torch.equal(l0(codes), per)
    torch.testing.assert_close(sae.decode_sparse(sae.encode_sparse(x, k=per)), sae.decode(codes))
    assert torch.equal(sae.with_k(3).encode(x), sae.encode(x, k=3))


@pytest.mark.parametrize("arch", ["hierarchical_topk", "adaptivek"])
def test_bad_budgets_are_refused_with_the_valid_range(arch):
    sae = make(arch)
    x = torch.randn(3, D)
    for bad in (0, -1, K + 1, True, 2.5, "4"):
        with pytest.raises(ArgumentError, match=rf"1\.\.{K}"):
            sae.encode(x, k=bad)
    with pytest.raises(ArgumentError, match=rf"1\.\.{K}"):
        sae.with_k(K + 1)
    with pytest.raises(ArgumentError, match=rf"1\.\.{K}"):
        sae.encode(x, k=torch.tensor([1, 0, 2]))
    with pytest.raises(ArgumentError, match=r"shape \(3,\)"):
        sae.encode(x, k=torch.tensor([1, 2]))
    with pytest.raises(ArgumentError, match="integer tensor"):
        sae.encode(x, k=torch.tensor([1.0, 2.0, 3.0]))


def test_architectures_without_a_budget_refuse_k():
    sae = SAE.from_config(SAEConfig(D, W, "jumprelu"), seed=0)
    with pytest.raises(ArgumentError, match="top-k family"):
        sae.encode(torch.randn(2, D), k=2)
    with pytest.raises(ArgumentError, match="complexity probe"):
        make("hierarchical_topk").complexity(torch.randn(2, D))


def test_config_checks_k_min():
    with pytest.raises(ValueError, match="needs k_min"):
        SAEConfig(D, W, "adaptivek", k=K)
    with pytest.raises(ValueError, match="larger than k"):
        SAEConfig(D, W, "adaptivek", k=K, k_min=K + 1)
    with pytest.raises(ValueError, match="only used by 'adaptivek'"):
        SAEConfig(D, W, "topk", k=K, k_min=2)


def test_adaptivek_k_follows_the_probe():
    sae = make("adaptivek")
    direction = torch.randn(D)
    sae.set_probe(direction / direction.norm() * 0.2, 0.5)
    x = torch.randn(200, D)
    s = sae.complexity(x).detach()
    k = sae.budget(x)
    assert s.shape == k.shape == (200,) and float(s.min()) >= 0 and float(s.max()) <= 1
    assert torch.equal(k, budget_from_complexity(s, 2, K))
    assert torch.equal(l0(sae.encode(x)), k)
    # more complex inputs get more latents (monotone map), and the extremes reach k_min and k_max
    order = s.argsort()
    assert (k[order].diff() >= 0).all()
    assert torch.equal(budget_from_complexity(torch.tensor([0.0, 0.5, 1.0]), 2, K), torch.tensor([2, 5, 8]))
    with pytest.raises(ShapeMismatchError, match=f"{D} entries"):
        sae.set_probe(torch.randn(D + 1), 0.0)
    with pytest.raises(ShapeMismatchError, match=f"{D} entries"):
        sae.set_probe(torch.randn(D, 2), 0.0)


@pytest.mark.parametrize("arch", ["hierarchical_topk", "adaptivek"])
def test_save_load_round_trip(tmp_path, arch):
    sae = make(arch, site="blocks.0.resid_post")
    if arch == "adaptivek":
        sae.set_probe(torch.randn(D) * 0.1, 0.4)
    x = torch.randn(50, D)
    sae.save(tmp_path / "s")
    back = SAE.load(tmp_path / "s")
    assert back.cfg == sae.cfg
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back.encode(x, k=3), sae.encode(x, k=3))
    if arch == "adaptivek":
        assert torch.equal(back.budget(x), sae.budget(x))


def test_load_refuses_a_probe_of_the_wrong_width(tmp_path):
    sae = make("adaptivek")
    tensors = {k: v.clone() for k, v in sae.state_dict().items()}
    tensors["probe_weight"] = torch.zeros(D + 3)
    with pytest.raises(CheckpointError, match="probe_weight has shape"):
        SAE.from_state_dict(sae.cfg, tensors)


def test_with_k_splices_and_measures_at_that_budget(tiny):
    d = tiny.site_width("blocks.0.resid_post")
    cfg = SAEConfig(d, 96, "hierarchical_topk", k=K, site="blocks.0.resid_post", model=tiny.name)
    sae = SAE.from_config(cfg, seed=1)
    x = torch.randn(64, d)
    assert reconstruction_metrics(sae.with_k(2), x).l0 == 2
    assert reconstruction_metrics(sae, x).l0 == K
    ids = torch.randint(3, 100, (1, 6))
    logits = run_with_sae(tiny, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, sae.with_k(2))
    assert torch.isfinite(logits).all()


def _reference_folder(tmp_path, d_in=D, d_sae=W, probe_width=D, config="dynamic_config.json"):
    """Files laid out as hiyukie/adaptiveK's DynamicTopKTrainer.save_model writes them."""
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(d_in, d_sae, generator=g)
    ae = {"encoder.weight": torch.randn(d_sae, d_in, generator=g), "encoder.bias": torch.randn(d_sae, generator=g),
          "decoder.weight": dec / dec.norm(dim=0), "b_dec": torch.randn(d_in, generator=g)}
    probe = {"weights": torch.randn(probe_width, 1, generator=g), "bias": torch.tensor([5.0])}
    torch.save(ae, tmp_path / "ae.pt")
    torch.save(probe, tmp_path / "probe.pt")
    cfg = {"activation_dim": d_in, "dict_size": d_sae, "base_k": 5, "min_k": 2, "max_k": K, "l1_weight": 0.005,
           "probe_weight": 0.05, "trainer_type": "DynamicTopKTrainer"}
    (tmp_path / config).write_text(json.dumps(cfg) if config == "dynamic_config.json" else
                                   json.dumps({"trainer": {**cfg, "dict_class": "AutoEncoderDynamicTopK"}}))
    return ae, probe


def _reference_forward(ae, probe, x):
    """hiyukie/adaptiveK's AutoEncoderDynamicTopK.forward with its LinearProbe (min_score 0, max_score 10)."""
    scores = (x @ probe["weights"] + probe["bias"]).clamp(0, 10).squeeze(-1)
    k = (2 + torch.sigmoid(6 * (scores / 10 - 0.5)) * (K - 2)).clamp(2, K).round().int()
    post = torch.relu((x - ae["b_dec"]) @ ae["encoder.weight"].T + ae["encoder.bias"])
    codes = torch.zeros_like(post)
    for i in range(x.shape[0]):
        v, j = post[i].topk(int(k[i]))
        codes[i, j] = v
    return codes @ ae["decoder.weight"].T + ae["b_dec"], codes, k


@pytest.mark.parametrize("config", ["dynamic_config.json", "config.json"])
def test_reads_the_adaptivek_reference_files(tmp_path, config):
    ae, probe = _reference_folder(tmp_path, config=config)
    sae = SAE.from_dictionary_learning(tmp_path)
    assert sae.cfg.architecture == "adaptivek" and (sae.cfg.k_min, sae.cfg.k) == (2, K)
    x = torch.randn(300, D) * 2
    recon, codes, k = _reference_forward(ae, probe, x)
    assert len(set(k.tolist())) > 2  # the probe really varies k here
    assert torch.equal(sae.budget(x), k.long())
    torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).reconstruction, recon, rtol=1e-5, atol=1e-5)


def test_reference_probe_of_the_wrong_width_or_missing_is_refused(tmp_path):
    _reference_folder(tmp_path, probe_width=D + 1)
    with pytest.raises(CheckpointError, match=r"weights has shape \(17, 1\), expected \(16, 1\)"):
        SAE.from_dictionary_learning(tmp_path)
    (tmp_path / "probe.pt").unlink()
    with pytest.raises(CheckpointError, match="probe.pt: missing"):
        SAE.from_dictionary_learning(tmp_path)
