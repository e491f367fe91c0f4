"""Steering panel: rows of steer items (SAE latents and vectors mixed) with strength, method and positions; a
prompt; Generate runs the caller's steered generation in a thread (busy state, Cancel); unsteered and steered
text side by side; a strength sweep; copy as code."""

from __future__ import annotations

import inspect
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import traitlets as t

from widgets._base import MAX_PAYLOAD_BYTES, PayloadError, Widget, check_size, css, esm

log = logging.getLogger(__name__)

METHODS = {"latent": ("add", "clamp", "scale", "ablate"), "vector": ("add", "project_out", "cap")}
POSITIONS = ("all", "prompt", "generated")


def check_item(item: Any) -> dict:
    """A steer item dict (see CONTRACT) checked and completed: kind, name, site, finite strength within
    [min, max], a method valid for the kind, positions. Other keys (e.g. a spec's "latent", "sae", "unit") are
    kept when they are plain values."""
    if not isinstance(item, dict):
        raise TypeError(f"a steer item must be a dict, got {type(item).__name__}")
    kind = item.get("kind")
    if kind not in METHODS:
        raise ValueError(f"item kind must be 'latent' or 'vector', got {kind!r}")
    out = {"kind": kind, "name": str(item.get("name", "")), "site": str(item.get("site", "")),
           "method": item.get("method", "add"), "positions": item.get("positions", "all")}
    if not out["name"] or not out["site"]:
        raise ValueError(f"a steer item needs a name and a site, got {item!r}")
    for key, default in (("strength", 0.0), ("min", -100.0), ("max", 100.0)):
        out[key] = _finite(item.get(key, default), f"item {out['name']!r}: {key}")
    if out["min"] >= out["max"]:
        raise ValueError(f"item {out['name']!r}: min ({out['min']}) must be below max ({out['max']})")
    if out["method"] not in METHODS[kind]:
        raise ValueError(f"item {out['name']!r}: method for a {kind} must be one of {METHODS[kind]}, "
                         f"got {out['method']!r}")
    if out["positions"] not in POSITIONS:
        raise ValueError(f"item {out['name']!r}: positions must be one of {POSITIONS}, got {out['positions']!r}")
    for key, v in item.items():
        if key in out:
            continue
        if isinstance(v, float):
            v = _finite(v, f"item {out['name']!r}: {key}")
        elif not (v is None or isinstance(v, (str, int, bool))):
            raise TypeError(f"item {out['name']!r}: {key} must be a plain value (str/number/bool), got "
                            f"{type(v).__name__}")
        out[str(key)] = v
    return out


def _finite(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PayloadError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _takes_cancel(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "cancel" or p.kind is p.VAR_KEYWORD for p in params)


class SteeringPanel(Widget):
    """Steer with `items` (list of item dicts); `generate(items, prompt[, cancel=Event]) -> {"unsteered",
    "steered"}` runs off the UI thread; `to_code(items, prompt) -> str`; `sweep(items, prompt, strengths)`."""

    _esm = esm("steering_panel")
    _css = css("steering_panel")

    items = t.List(t.Dict()).tag(sync=True)
    prompt = t.Unicode("").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
    result = t.Dict().tag(sync=True)
    """{"unsteered": str, "steered": str} of the last finished Generate ({} before)."""
    error = t.Unicode("").tag(sync=True)
    status = t.Unicode("").tag(sync=True)
    code = t.Unicode("").tag(sync=True)
    sweep_strengths = t.List(t.Float()).tag(sync=True)
    sweep_rows = t.List(t.Dict()).tag(sync=True)
    has_code = t.Bool(False).tag(sync=True)
    has_sweep = t.Bool(False).tag(sync=True)

    def __init__(self, items: list[dict], generate: Callable[..., dict], *,
                 to_code: Callable[[list[dict], str], str] | None = None,
                 sweep: Callable[[list[dict], str, list[float]], list[dict]] | None = None, prompt: str = "",
                 sweep_strengths: list[float] | None = None, max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        for name, fn in (("generate", generate), ("to_code", to_code), ("sweep", sweep)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if generate is None:
            raise TypeError("generate must be a callable (items, prompt) -> {'unsteered': str, 'steered': str}")
        items = [check_item(i) for i in items]  # before the comm opens: bad data never reaches the page
        self._generate, self._to_code, self._sweep = generate, to_code, sweep
        self._cancel = threading.Event()
        self._job = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__(max_bytes=max_bytes)
        with self.hold_sync():
            self.items = list(items)
            self.prompt = prompt
            if sweep_strengths is None:  # five points over the first item's slider range
                lo, hi = (self.items[0]["min"], self.items[0]["max"]) if self.items else (0.0, 1.0)
                sweep_strengths = [round(lo + (hi - lo) * t / 4, 6) for t in range(5)]
            self.sweep_strengths = [float(x) for x in sweep_strengths]
            self.has_code, self.has_sweep = to_code is not None, sweep is not None

    @classmethod
    def from_spec(cls, spec: Any, model: Any, *, vectors: Any = None, saes: Any = None, max_new_tokens: int = 20,
                  **kwargs: Any) -> SteeringPanel:
        """A panel over a steering spec (toolkit.analysis.steering.SteeringSpec or anything with `to_items()`,
        `from_items(items, vectors=, saes=)`, `generate(model, prompts, max_new_tokens=)` and `to_code(prompt=,
        max_new_tokens=)`): Generate runs the spec rebuilt from the panel's items on `model` (greedy, so the
        copied code gives the same text); the sweep varies the first item's strength."""
        spec_cls = type(spec)
        for attr in ("to_items", "from_items", "generate", "to_code"):
            if not hasattr(spec_cls, attr):
                raise TypeError(f"from_spec needs a steering spec with {attr}(); got {spec_cls.__name__}")
        vectors = spec.vectors() if vectors is None and hasattr(spec, "vectors") else vectors
        saes = spec.saes() if saes is None and hasattr(spec, "saes") else saes

        def build(items: list[dict]) -> Any:
            return spec_cls.from_items(items, vectors=vectors, saes=saes)

        def run(items: list[dict], prompt: str) -> str:
            return build(items).generate(model, [prompt], max_new_tokens=max_new_tokens)[0]

        def generate(items: list[dict], prompt: str) -> dict:
            return {"unsteered": run([], prompt), "steered": run(items, prompt)}

        def to_code(items: list[dict], prompt: str) -> str:
            return build(items).to_code(prompt=prompt, max_new_tokens=max_new_tokens)

        def sweep(items: list[dict], prompt: str, strengths: list[float]) -> list[dict]:
            if not items:
                raise ValueError("add a steer item before sweeping")
            return [{"strength": s, items[0]["name"]: run([{**items[0], "strength": s}, *items[1:]], prompt)}
                    for s in strengths]

        kwargs.setdefault("to_code", to_code)
        kwargs.setdefault("sweep", sweep)
        return cls(spec.to_items(), generate, **kwargs)

    def __repr__(self) -> str:
        kinds = [i["kind"] for i in self.items]
        return (f"SteeringPanel({len(kinds)} items: {kinds.count('latent')} latents, {kinds.count('vector')} "
                f"vectors)")

    @t.validate("items")
    def _check_items(self, proposal: Any) -> list[dict]:
        items = [check_item(i) for i in proposal["value"]]
        check_size(sum(len(repr(i)) for i in items), "steering items", self._max_bytes)
        return items

    @t.validate("sweep_strengths")
    def _check_strengths(self, proposal: Any) -> list[float]:
        vals = list(proposal["value"])
        if not all(math.isfinite(v) for v in vals):
            raise PayloadError(f"sweep strengths must be finite, got {vals}")
        return vals

    def add_item(self, item: dict) -> None:
        """Append a steer item (checked)."""
        self.items = [*self.items, item]

    def set_strength(self, index: int, strength: float) -> None:
        """Set item `index`'s strength (what the slider does)."""
        items = [dict(i) for i in self.items]
        items[index]["strength"] = strength
        self.items = items

    def run(self) -> dict:
        """Generate now, in this thread (for scripts and notebooks); updates `result` and returns it."""
        self.result = self._check_result(self._call_generate(self.items, self.prompt, threading.Event()))
        return self.result

    # ---- jobs off the UI thread -------------------------------------------------------------------
    def _call_generate(self, items: list[dict], prompt: str, cancel: threading.Event) -> Any:
        if _takes_cancel(self._generate):
            return self._generate(items, prompt, cancel=cancel)
        return self._generate(items, prompt)

    @staticmethod
    def _check_result(r: Any) -> dict:
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("unsteered", "steered")):
            raise TypeError(f"generate must return {{'unsteered': str, 'steered': str}}, got {r!r:.200}")
        return {"unsteered": r["unsteered"], "steered": r["steered"]}

    def _start(self, label: str, job: Callable[[threading.Event], Any], done: Callable[[Any], None]) -> int:
        with self._lock:
            if self.busy:
                raise RuntimeError("a job is still running: Cancel it or wait")
            self._job += 1
            ticket, cancel = self._job, threading.Event()
            self._cancel = cancel
            self.error, self.status, self.busy = "", f"{label}…", True

        def work() -> None:
            try:
                out, err = job(cancel), None
            except Exception as e:
                out, err = None, e
                log.exception("steering job %r failed", label)
            with self._lock:
                if cancel.is_set() or ticket != self._job:
                    return  # cancelled: the page has moved on; drop the late answer
                try:
                    if err is None:
                        done(out)
                        self.status = f"{label} done"
                    else:
                        self.error, self.status = f"{type(err).__name__}: {err}", f"{label} failed"
                except Exception as e:
                    self.error, self.status = f"{type(e).__name__}: {e}", f"{label} failed"
                self.busy = False

        self._thread = threading.Thread(target=work, name=f"steering-{label}", daemon=True)
        self._thread.start()
        return ticket

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the running job (if any) finishes; False on timeout."""
        th = self._thread
        if th is None:
            return True
        th.join(timeout)
        return not th.is_alive()

    def _on_generate(self, msg: dict) -> dict:
        items, prompt = list(self.items), self.prompt
        ticket = self._start("generate", lambda c: self._call_generate(items, prompt, c),
                             lambda r: setattr(self, "result", self._check_result(r)))
        return {"job": ticket}

    def _on_sweep(self, msg: dict) -> dict:
        if self._sweep is None:
            raise ValueError("this panel was built without a sweep callable")
        items, prompt, strengths = list(self.items), self.prompt, list(self.sweep_strengths)
        ticket = self._start("sweep", lambda c: self._sweep(items, prompt, strengths),
                             lambda rows: setattr(self, "sweep_rows", _check_rows(rows)))
        return {"job": ticket}

    def _on_cancel(self, msg: dict) -> dict:
        with self._lock:
            was = self.busy
            self._cancel.set()
            self.busy = False
            if was:
                self.status = "cancelled"
        return {"cancelled": was}

    def _on_code(self, msg: dict) -> dict:
        if self._to_code is None:
            raise ValueError("this panel was built without to_code")
        code = self._to_code(list(self.items), self.prompt)
        if not isinstance(code, str):
            raise TypeError(f"to_code must return a str, got {type(code).__name__}")
        self.code = code
        return {"code": code}


def _check_rows(rows: Any) -> list[dict]:
    out = []
    for r in rows:
        if not isinstance(r, dict):
            raise TypeError(f"sweep rows must be dicts, got {type(r).__name__}")
        row = {}
        for k, v in r.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise PayloadError(f"sweep row {k!r} is {v}; widget data must be finite")
            row[str(k)] = v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
        out.append(row)
    return out
