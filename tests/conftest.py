"""Shared fixtures: a tiny random Gemma-2 (instant) and deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Gemma-2 (2 layers, width 64) shared by the session; tests must not change its weights."""
    from toolkit.models import tiny_gemma2

    return tiny_gemma2(seed=0)


@pytest.fixture(scope="session")
def tiny4():
    """A 4-layer tiny Gemma-2, for early-stopping tests that need layers after the one read."""
    from toolkit.models import tiny_gemma2

    return tiny_gemma2(seed=1, n_layers=4)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small-tensor tests: thread hand-offs cost more than the maths, and the
    tests do not fight other processes for cores. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
