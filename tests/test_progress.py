"""Progress bars refresh at a bounded rate: a long notebook cell must not flood the kernel's IOPub channel
(nbval reads it only after the cell ends and then misses the cell's end: "Timeout ... waiting for output")."""

from __future__ import annotations

import io
import time

import pytest
import torch
from tqdm import std

from toolkit.progress import DEFAULT_MININTERVAL, mininterval, progress_bar
from toolkit.training.crosscoder_trainer import train_crosscoder
from toolkit.training.sae_trainer import train_sae


def test_mininterval_follows_tqdm_env(monkeypatch) -> None:
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert mininterval() == DEFAULT_MININTERVAL
    monkeypatch.setenv("TQDM_MININTERVAL", "7")
    assert mininterval() == 7.0
    assert progress_bar(range(3), desc="x", file=io.StringIO()).mininterval == 7.0
    monkeypatch.setenv("TQDM_MININTERVAL", "often")
    with pytest.raises(ValueError, match="TQDM_MININTERVAL.*'often'"):
        mininterval()


def _sae_run() -> None:
    from tests.training.test_train import config, synthetic

    train_sae(config("topk", steps=400, log_every=10), synthetic, progress=True)


def _crosscoder_run() -> None:
    from tests.crosscoder.test_crosscoder import _cfg, synthetic_pair

    train_crosscoder(_cfg(), synthetic_pair(1024)[0], total_steps=400, batch_size=64, progress=True)


@pytest.mark.parametrize("run", [_sae_run, _crosscoder_run], ids=["sae", "crosscoder"])
def test_training_bars_refresh_at_most_every_mininterval(run, monkeypatch) -> None:
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    shown = []
    display = std.tqdm.display
    monkeypatch.setattr(std.tqdm, "display", lambda self, *a, **kw: shown.append(1) or display(self, *a, **kw))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    # first draw + final draw + one per elapsed interval (a postfix forced on every step gave 400)
    assert 2 <= len(shown) <= 3 + elapsed / DEFAULT_MININTERVAL, (len(shown), elapsed)
