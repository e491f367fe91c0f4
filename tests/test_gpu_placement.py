"""GPU placement (marked `gpu`; skipped without CUDA): a model loaded on CUDA in bf16 traces there, an SAE trained
with device="cuda" stays there and its top-k kernels choose Triton on their own, and one training step agrees
with the CPU twin."""

from __future__ import annotations

import pytest
import torch

from toolkit.config import SAEConfig, TrainConfig
from toolkit.kernels import last_backend
from toolkit.models import load_model, tiny_gemma2
from toolkit.tracing import capture
from toolkit.training import train_sae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _batches(start: int):
    i = start
    while True:
        g = torch.Generator().manual_seed(i)
        yield torch.randn(256, 64, generator=g).relu()
        i += 1


def test_model_loads_and_traces_on_cuda_in_bf16(tmp_path):
    tiny = tiny_gemma2()
    tiny.hf.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), device="cuda", dtype=torch.bfloat16)
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    acts = capture(model, ["The cat sat on the mat"], ["blocks.1.resid_post"])
    a = acts["blocks.1.resid_post"]
    assert a.dtype == torch.bfloat16 and bool(torch.isfinite(a.float()).all())


def test_sae_trains_on_cuda_with_triton_kernels_chosen_automatically():
    cfg = TrainConfig(SAEConfig(64, 256, "topk", k=8), batch_size=256, total_steps=20, lr=1e-3, device="cuda")
    res = train_sae(cfg, _batches, progress=False)
    assert res.sae.W_enc.device.type == "cuda" and res.steps == 20
    assert last_backend() == "triton"
    assert res.history[-1]["fvu"] < res.history[0]["fvu"] or len(res.history) == 1


def test_one_cuda_step_matches_the_cpu_twin():
    results = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(SAEConfig(64, 256, "topk", k=8), batch_size=256, total_steps=3, lr=1e-3, device=device)
        results[device] = train_sae(cfg, _batches, progress=False).sae.state_dict()
    for k, v in results["cpu"].items():
        torch.testing.assert_close(results["cuda"][k].cpu(), v, rtol=1e-3, atol=1e-4, msg=k)
