"""One trace at a time per model, and never a trace inside another.

Every toolkit entry that runs a model (capture, edits, generation, attention patterns, the judge's forward)
holds the model's re-entrant lock (`Model.lock`) for the whole trace or generation, so calls from several
threads on one model (a widget callback runs on another thread) are serialized instead of tangling nnsight's
state. Before taking the lock it refuses nesting: a toolkit call made while this thread is already inside a
toolkit trace (e.g. from a Splice function or an edit) or inside a user's own `with model.nn.trace(...)` block
raises NestedTraceError, which cannot deadlock because it is raised before the lock is asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from toolkit.errors import NestedTraceError

if TYPE_CHECKING:
    from toolkit.models import Model

_local = threading.local()


def _inside_nnsight() -> bool:
    """True inside the body of an nnsight trace: nnsight 0.8 runs it in a greenlet that carries a mediator."""
    try:
        from greenlet import getcurrent
    except ImportError:  # pragma: no cover - nnsight depends on greenlet
        return False
    return getattr(getcurrent(), "mediator", None) is not None


def active_trace() -> str | None:
    """What this thread is running inside ("capture on tiny-gemma2-seed0", ...), or None."""
    return getattr(_local, "active", None)


@contextmanager
def exclusive(model: Model, what: str) -> Iterator[None]:
    """Hold `model`'s lock for the block and mark this thread as inside `what`; NestedTraceError if it already is."""
    outer = active_trace()
    if outer is not None:
        raise NestedTraceError(
            f"{what} was called while {outer} is running on this thread (from inside a Splice function, an edit "
            "or a hook): a trace cannot be opened inside another. Compute what the function needs before the "
            "outer call (capture first, then close over the tensors), or run the second call after it returns.")
    if _inside_nnsight():
        raise NestedTraceError(
            f"{what} was called inside an nnsight trace (a `with model.nn.trace(...)` or `.generate(...)` block): "
            "toolkit calls open their own trace. Call it before or after the `with` block, or read the "
            "activations inside the block with nnsight itself.")
    with model.lock:
        _local.active = f"{what} on {model.name}"
        try:
            yield
        finally:
            _local.active = None
