"""Concurrent calls on one model are serialized (results equal serial calls), and a trace opened inside another
(from a Splice function, an edit or a user's nnsight block) raises NestedTraceError instead of nnsight internals."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from toolkit.analysis.judge import continuation_nll
from toolkit.errors import NestedTraceError
from toolkit.tracing import Add, Splice, capture, generate, run_with_edits
from toolkit.tracing.attention import attention_patterns
from toolkit.tracing.guard import active_trace
from toolkit.tracing.hooked import generate_hooked

SITE = "blocks.1.resid_post"
PROMPTS = ["The cat sat on", "Water boils at", "Paris is the", "The quick brown"]


def _work(model, i: int) -> list:
    p = PROMPTS[i % len(PROMPTS)]
    v = torch.full((64,), 0.1 * (i + 1))
    return [capture(model, p, SITE)[SITE],
            generate(model, p, [Add(SITE, v)], max_new_tokens=3),
            generate_hooked(model, p, [Add(SITE, v)], max_new_tokens=3),
            run_with_edits(model, p, [Add(SITE, v)])[0],
            attention_patterns(model, p).pattern,
            continuation_nll(model, [p], [" the mat"])]


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


def test_four_threads_on_one_model_equal_serial_calls(tiny):
    calls = [(t, j) for t in range(4) for j in range(3)]
    serial = {(t, j): _work(tiny, t + j) for t, j in calls}
    got, errors = {}, []

    def run(t: int) -> None:
        try:
            for j in range(3):
                got[(t, j)] = _work(tiny, t + j)
        except Exception as e:  # noqa: BLE001 - reported below with the thread
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
    assert not errors, errors
    assert set(got) == set(serial) and all(_same(got[k], serial[k]) for k in serial)


def test_the_lock_is_re_entrant_and_free_after_each_call(tiny):
    capture(tiny, "The cat", SITE)
    assert tiny.lock.acquire(blocking=False)  # nobody holds it
    try:
        assert capture(tiny, "The cat", SITE)[SITE].shape[-1] == 64  # the holder's own thread may trace
    finally:
        tiny.lock.release()


def _nested(model):
    def fn(x):
        capture(model, "hello", "blocks.0.resid_post")
        return x
    return Splice(SITE, fn)


@pytest.mark.parametrize("outer", ["run_with_edits", "generate", "generate_hooked"])
def test_a_toolkit_call_from_inside_a_splice_function_is_a_clear_error(tiny, outer):
    fn = {"run_with_edits": run_with_edits, "generate": generate, "generate_hooked": generate_hooked}[outer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnsight reports the unwound intervention as a warning too
        with pytest.raises(NestedTraceError, match=rf"capture was called while {outer} on tiny-gemma2-seed0 is "
                                                   r"running on this thread \(from inside a Splice function"):
            fn(tiny, "The cat", [_nested(tiny)])
    assert active_trace() is None
    assert capture(tiny, "The cat", SITE)[SITE].shape[-1] == 64  # flag cleared, lock released


def test_a_toolkit_call_inside_a_users_nnsight_trace_is_a_clear_error(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NestedTraceError, match=r"inside an nnsight trace .* before or after the `with` block"):
            with tiny.nn.trace("The cat"):
                capture(tiny, "hello", SITE)
    assert capture(tiny, "The cat", SITE)[SITE].shape[-1] == 64
