"""Per-call backend choice: explicit override, environment variable, device default, no import-time choice."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import toolkit.kernels.dispatch as K
from tests.kernels.helpers import make_sae, make_x

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_default_is_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is never chosen automatically
    t = torch.zeros(2)
    assert K.select_backend(t) == "torch"
    assert K.select_backend(t, "auto") == "torch"
    assert K.select_backend(t, "torch") == "torch"


def test_env_var_is_the_default(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.setenv("TOOLKIT_KERNEL_BACKEND", "torch")
    assert K.select_backend(t) == "torch"
    monkeypatch.setenv("TOOLKIT_KERNEL_BACKEND", "Auto ")
    assert K.select_backend(t) == "torch"
    monkeypatch.setenv("TOOLKIT_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"\$TOOLKIT_KERNEL_BACKEND.*'cuda'"):
        K.select_backend(t)
    assert K.select_backend(t, "torch") == "torch", "an explicit choice wins over the env var"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    t = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1") as info:
        K.select_backend(t, "triton")
    assert "cpu" in str(info.value) and "backend='torch'" in str(info.value)
    monkeypatch.setenv("TOOLKIT_KERNEL_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"\$TOOLKIT_KERNEL_BACKEND='triton'"):
        K.encode(make_x(2, 8), *make_sae(8, 12)[:2], activation="relu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.select_backend(t, "triton") == "triton"
    assert K.select_backend(t) == "triton"


def test_bad_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of.*'gpu'"):
        K.select_backend(torch.zeros(1), "gpu")


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(K, "_triton_installed", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        K.select_backend(torch.zeros(1), "triton")


def test_last_backend_is_per_thread(triton_env):
    W_enc, b_enc, W_dec, _ = make_sae(16, 24, device=triton_env)
    x = make_x(3, 16, device=triton_env)
    K.encode(x, W_enc, b_enc, activation="relu", backend="torch")
    assert K.last_backend() == "torch"
    K.encode(x, W_enc, b_enc, activation="relu", backend="triton")
    assert K.last_backend() == "triton"
    K.decode_sparse(
        torch.zeros(3, 2, dtype=torch.long, device=triton_env),
        x[:, :2],
        W_dec[:, :16].contiguous(),
        backend="torch",
    )
    assert K.last_backend() == "torch"
    seen = []
    worker = threading.Thread(target=lambda: seen.append(K.last_backend()))
    worker.start()
    worker.join()
    assert seen == [None]


def test_import_does_not_import_triton_or_print():
    code = (
        "import sys, torch, toolkit.kernels as K\n"
        "assert 'triton' not in sys.modules, 'imported at import time'\n"
        "x = torch.randn(3, 8); W = torch.randn(8, 12); b = torch.zeros(12)\n"
        "K.encode(x, W, b, activation='topk', k=2)\n"
        "K.decode_dense(torch.relu(x @ W), W.t().contiguous())\n"
        "assert 'triton' not in sys.modules, 'the torch path imported triton'\n"
        "assert K.last_backend() == 'torch'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TOOLKIT_KERNEL_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == "", (res.stdout, res.stderr)
