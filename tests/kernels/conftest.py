"""Kernel tests run Triton in its CPU interpreter when there is no CUDA.

The interpreter is switched on per test (monkeypatch), so other tests in the same session never see
TRITON_INTERPRET. The @triton.jit decorators read it when the kernel modules are imported: if another
test imported them without it, they are reloaded here under the interpreter.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
KERNEL_MODULES = ("toolkit.kernels.triton_encode", "toolkit.kernels.triton_decode")


def _ensure_interpreted() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    for name in KERNEL_MODULES:
        module = sys.modules.get(name)
        if module is None:
            importlib.import_module(name)
            continue
        kernel = next(v for k, v in vars(module).items() if k.startswith("_") and k.endswith("_kernel"))
        if not isinstance(kernel, InterpretedFunction):
            importlib.reload(module)


@pytest.fixture
def triton_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make the Triton path runnable here: CUDA if present, else the interpreter. Returns the device."""
    pytest.importorskip("triton")
    if HAS_CUDA:
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _ensure_interpreted()
    return "cpu"


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOOLKIT_KERNEL_BACKEND", raising=False)
