"""What every widget shares: payload checks before anything syncs, arrays as bytes, lazy requests by message.

The page asks for what it needs with a custom message {"type": ..., "id": ...}; the widget answers with the
same type and id. Numbers in an answer travel as binary buffers (a numpy array becomes {"$buf": i, "dtype":
"f4"|"i4"} in the JSON part and buffers[i] beside it), never as JSON lists.
"""

from __future__ import annotations

import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

import anywidget
import numpy as np
from toolkit.errors import NonFiniteError, ToolkitError

log = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).parent
MAX_PAYLOAD_BYTES = 64 * 2**20
"""Default cap on a widget's state and on one answer (a 1M-latent store with four stats is ~16 MB)."""


class PayloadError(ToolkitError, ValueError):
    """Data for a widget that is malformed or larger than its size cap; raised before anything syncs."""


def esm(name: str) -> str:
    """The ES module of a widget: the shared helpers (_common.js) followed by the widget's own file.

    anywidget loads one module per widget and cannot resolve imports between local files, so the shared
    helpers are put in front of each widget's module here instead of being copied into every file."""
    return (HERE / "_common.js").read_text() + "\n" + (HERE / f"{name}.js").read_text()


def css(name: str) -> str:
    """The widget's stylesheet, after the shared one."""
    return (HERE / "_common.css").read_text() + "\n" + (HERE / f"{name}.css").read_text()


def finite_array(values: Any, name: str, *, dtype: Any = np.float32, n: int | None = None) -> np.ndarray:
    """`values` as a 1-D array of `dtype`, checked: the right length and no NaN or inf."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise PayloadError(f"{name} must be a 1-D array of numbers: {e}") from None
    if arr.ndim != 1:
        raise PayloadError(f"{name} must be 1-D (one value per latent), got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise PayloadError(f"{name} has {arr.shape[0]} values but there are {n} latents")
    if arr.dtype.kind not in "biuf":
        raise PayloadError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise NonFiniteError(f"{name} has {int(bad.sum())} NaN/inf values (first at index "
                                 f"{int(np.argmax(bad))}); a widget needs finite numbers — pass a valid mask or "
                                 "replace them (np.nan_to_num) before building it")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype, copy=False)
    if np.dtype(dtype).kind == "f" and not np.isfinite(out).all():
        raise NonFiniteError(f"{name} overflows {np.dtype(dtype).name}")
    return np.ascontiguousarray(out)


def check_size(nbytes: int, what: str, cap: int) -> None:
    """Refuse a payload over the cap, saying how large it is and how to raise the cap."""
    if nbytes > cap:
        raise PayloadError(f"{what} is {nbytes / 2**20:.1f} MiB, over the widget's cap of {cap / 2**20:.1f} MiB; "
                           "send fewer latents/contexts or pass max_bytes=... to the widget")


def contexts(ctxs: Any, where: str) -> list[dict]:
    """Token contexts [{"tokens": [str], "acts": [float]}] checked (one act per token) with acts as arrays."""
    out = []
    for i, c in enumerate(ctxs):
        tokens = [str(x) for x in c["tokens"]]
        acts = np.asarray(c["acts"], dtype=np.float32)
        if acts.shape != (len(tokens),):
            raise PayloadError(f"{where}[{i}]: {len(tokens)} tokens but acts has shape {acts.shape}")
        out.append({"tokens": tokens, "acts": acts})
    return out


def pairs(rows: Any) -> list[list]:
    """[[token, value], ...] rows (logit lens) as plain str/float pairs."""
    return [[str(tok), float(v)] for tok, v in rows]


def pack(obj: Any, cap: int = MAX_PAYLOAD_BYTES, what: str = "answer") -> tuple[Any, list[bytes]]:
    """Split `obj` into JSON-safe content and binary buffers (numpy arrays → buffers), checking that every
    number is finite and the whole stays under `cap` bytes."""
    buffers: list[bytes] = []
    size = [0]

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, np.ndarray):
            if o.dtype.kind == "f":
                a = finite_array(o.ravel(), path, dtype=np.float32)
                code = "f4"
            elif o.dtype.kind in "biu":
                a, code = np.ascontiguousarray(o.ravel(), dtype=np.int32), "i4"
            else:
                raise PayloadError(f"{path}: arrays must hold numbers, got dtype {o.dtype}")
            buffers.append(a.tobytes())
            size[0] += a.nbytes
            return {"$buf": len(buffers) - 1, "dtype": code}
        if isinstance(o, dict):
            return {str(k): walk(v, f"{path}.{k}") for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(o)]
        if isinstance(o, (bool, np.bool_)):
            return bool(o)
        if isinstance(o, (int, np.integer)):
            return int(o)
        if isinstance(o, (float, np.floating)):
            if not math.isfinite(o):
                raise NonFiniteError(f"{path} is {o}; widget data must be finite")
            size[0] += 8
            return float(o)
        if o is None:
            return None
        if isinstance(o, str):
            size[0] += len(o)
            return o
        raise PayloadError(f"{path}: cannot send a {type(o).__name__} to the page (numbers, strings, lists, "
                           "dicts and numpy arrays only)")

    content = walk(obj, what)
    check_size(size[0], what, cap)
    return content, buffers


class Widget(anywidget.AnyWidget):
    """An anywidget whose page requests go to `_on_<type>` methods; their return value is the answer."""

    def __init__(self, *, max_bytes: int = MAX_PAYLOAD_BYTES, **kwargs: Any) -> None:
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        self._max_bytes = max_bytes
        super().__init__(**kwargs)
        self.on_msg(self._dispatch)

    def _dispatch(self, _widget: Any, content: dict, buffers: list) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        handler: Callable[[dict], Any] | None = getattr(self, f"_on_{kind}", None) if isinstance(kind, str) else None
        reply: dict[str, Any] = {"type": kind, "id": content.get("id") if isinstance(content, dict) else None}
        if handler is None:
            reply.update(type="error", request=kind, message=f"unknown request {kind!r}")
            self.send(reply)
            return
        try:
            data, bufs = pack(handler(content), self._max_bytes, f"answer to {kind!r}")
        except Exception as e:  # the page shows the error; the kernel log keeps the traceback
            log.exception("widget request %r failed", kind)
            reply.update(type="error", request=kind, message=f"{type(e).__name__}: {e}")
            self.send(reply)
            return
        if data is not None:
            reply["data"] = data
            self.send(reply, buffers=bufs)

    def _check_state_size(self, *arrays: np.ndarray | bytes, extra: int = 0) -> None:
        total = sum(len(a) if isinstance(a, bytes) else a.nbytes for a in arrays) + extra
        check_size(total, f"{type(self).__name__} state", self._max_bytes)


def check_latent(i: Any, n: int, name: str = "latent") -> int:
    """`i` as an int in 0..n-1, or a FeatureIndexError naming the range."""
    from toolkit.errors import FeatureIndexError

    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < n:
        raise FeatureIndexError(f"{name} must be an integer in 0..{n - 1}, got {i!r}")
    return int(i)
