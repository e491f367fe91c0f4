"""Feature explorer: a searchable, virtualized list of every SAE latent and a page per latent (histograms,
shaded top contexts, logit lens, neighbours), with a text box and a hand-off to a steering panel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import traitlets as t

from widgets._base import (
    MAX_PAYLOAD_BYTES,
    PayloadError,
    Widget,
    check_latent,
    contexts,
    css,
    esm,
    finite_array,
    pairs,
)

SEARCH_KINDS = ("token", "context")


class FeatureExplorer(Widget):
    """Browse `n` latents: `density` and `max_act` arrays (one value per latent) go to the page once as bytes;
    `details(latent)`, `search(query, by)` and `text_fn(text)` are called when the page asks (see CONTRACT)."""

    _esm = esm("feature_explorer")
    _css = css("feature_explorer")

    n_latents = t.Int(0).tag(sync=True)
    density = t.Bytes(b"").tag(sync=True)
    max_act = t.Bytes(b"").tag(sync=True)
    labels = t.List(t.Unicode()).tag(sync=True)
    selected = t.Int(-1).tag(sync=True)
    """The latent shown (-1: none). Set it in Python to move the page; a click in the page sets it here."""
    title = t.Unicode("").tag(sync=True)
    dense_threshold = t.Float(0.1).tag(sync=True)
    has_search = t.Bool(False).tag(sync=True)
    has_text = t.Bool(False).tag(sync=True)
    can_steer = t.Bool(False).tag(sync=True)

    def __init__(self, density: Any, max_act: Any, details: Callable[[int], dict], *,
                 search: Callable[[str, str], Any] | None = None, text_fn: Callable[[str], dict] | None = None,
                 labels: list[str] | None = None, title: str = "", dense_threshold: float = 0.1,
                 max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        dens = finite_array(density, "density")
        n = len(dens)
        if n == 0:
            raise PayloadError("density is empty: a feature explorer needs at least one latent")
        if dens.min() < 0 or dens.max() > 1:
            raise PayloadError(f"density must be a firing fraction in [0, 1], got values in [{dens.min()}, {dens.max()}]")
        mx = finite_array(max_act, "max_act", n=n)
        for name, fn in (("details", details), ("search", search), ("text_fn", text_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if details is None:
            raise TypeError("details must be a callable latent -> dict (see FeatureStore.latent_details)")
        labels = [] if labels is None else [str(x) for x in labels]
        if labels and len(labels) != n:
            raise PayloadError(f"labels has {len(labels)} entries but there are {n} latents")
        self._details, self._search, self._text_fn = details, search, text_fn
        self._steering: Any = None
        self._steer_defaults: dict[str, Any] = {}
        self._steer_extra: dict[str, Any] = {}
        super().__init__(max_bytes=max_bytes)
        self._check_state_size(dens, mx, extra=sum(len(x) + 3 for x in labels))
        with self.hold_sync():
            self.n_latents = n
            self.density, self.max_act, self.labels = dens.tobytes(), mx.tobytes(), labels
            self.title, self.dense_threshold = title, float(dense_threshold)
            self.has_search, self.has_text = search is not None, text_fn is not None

    @classmethod
    def from_store(cls, store: Any, text_fn: Callable[[str], dict] | None = None, **kwargs: Any) -> FeatureExplorer:
        """An explorer over a FeatureStore (anything with `density`, `max_act`, `latent_details(i)` and
        `search(query, by)`); `text_fn` e.g. functools.partial(token_latents, model, sae)."""
        for attr in ("density", "max_act", "latent_details"):
            if not hasattr(store, attr):
                raise TypeError(f"from_store needs an object with .density, .max_act and .latent_details(i); "
                                f"{type(store).__name__} has no {attr!r}")
        kwargs.setdefault("labels", getattr(store, "labels", None))
        return cls(np.asarray(store.density), np.asarray(store.max_act), store.latent_details,
                   search=getattr(store, "search", None), text_fn=text_fn, **kwargs)

    def __repr__(self) -> str:
        return f"FeatureExplorer({self.n_latents} latents, selected={self.selected})"

    @t.validate("selected")
    def _check_selected(self, proposal: Any) -> int:
        v = proposal["value"]
        return -1 if v == -1 else check_latent(v, self.n_latents, "selected")

    def select(self, latent: int) -> None:
        """Show `latent` in the page (same as setting `selected`)."""
        self.selected = latent

    def link_steering(self, panel: Any, *, site: str, strength: float = 1.0, min: float = -2.0, max: float = 2.0,
                      method: str = "add", positions: str = "all", **extra: Any) -> None:
        """Let "steer with this latent" add the selected latent to `panel` (a SteeringPanel) as item
        {"kind": "latent", "name": "<site>/<latent>", "latent": ..., "site": site, ...}; `extra` keys (e.g.
        sae="<name>" for SteeringSpec.from_items) are added to the item."""
        if not hasattr(panel, "add_item"):
            raise TypeError(f"panel must be a SteeringPanel (has add_item), got {type(panel).__name__}")
        self._steering = panel
        self._steer_defaults = {"site": site, "strength": strength, "min": min, "max": max, "method": method,
                                "positions": positions}
        self._steer_extra = extra
        self.can_steer = True

    # ---- answers to the page ------------------------------------------------------------------------
    def _on_details(self, msg: dict) -> dict:
        latent = check_latent(msg.get("latent"), self.n_latents)
        d = self._details(latent)
        if not isinstance(d, dict):
            raise PayloadError(f"details({latent}) must return a dict, got {type(d).__name__}")
        hist = d.get("hist") or {"edges": np.zeros(0), "counts": np.zeros(0)}
        hist = {"edges": np.asarray(hist["edges"], np.float32), "counts": np.asarray(hist["counts"], np.int64)}
        if len(hist["counts"]) and len(hist["edges"]) != len(hist["counts"]) + 1:
            raise PayloadError(f"details({latent})['hist']: edges must have one more entry than counts")
        out = {"latent": latent, "density": float(d.get("density", 0.0)), "max_act": float(d.get("max_act", 0.0)),
               "hist": hist, "top": contexts(d.get("top", []), f"details({latent})['top']"),
               "quantiles": [{"label": str(q.get("label", "")),
                              "examples": contexts(q.get("examples", []), f"details({latent}) quantile")}
                             for q in d.get("quantiles", [])],
               "promoted": pairs(d.get("promoted", [])), "suppressed": pairs(d.get("suppressed", [])),
               "neighbours": [[int(j), float(c)] for j, c in d.get("neighbours", [])]}
        return out

    def _on_search(self, msg: dict) -> dict:
        query, by = str(msg.get("query", "")), msg.get("by")
        if by not in SEARCH_KINDS:
            raise ValueError(f"search by must be one of {SEARCH_KINDS}, got {by!r}")
        if self._search is None:
            raise ValueError("this explorer was built without a search callable")
        hits = np.asarray(self._search(query, by), dtype=np.int64).ravel()
        if len(hits) and (hits.min() < 0 or hits.max() >= self.n_latents):
            raise PayloadError(f"search returned latents outside 0..{self.n_latents - 1}")
        return {"query": query, "by": by, "latents": hits}

    def _on_text(self, msg: dict) -> dict:
        if self._text_fn is None:
            raise ValueError("this explorer was built without text_fn")
        r = self._text_fn(str(msg.get("text", "")))
        tokens = [str(x) for x in r["tokens"]]
        per = r["latents"]
        if len(per) != len(tokens):
            raise PayloadError(f"text_fn returned {len(tokens)} tokens but {len(per)} latent lists")
        return {"tokens": tokens,
                "latents": [{"ids": np.asarray([int(j) for j, _ in p], dtype=np.int64),
                             "acts": np.asarray([float(a) for _, a in p], dtype=np.float32)} for p in per]}

    def _on_steer(self, msg: dict) -> dict:
        if self._steering is None:
            raise ValueError("no steering panel linked: call explorer.link_steering(panel, site=...)")
        latent = check_latent(msg.get("latent"), self.n_latents)
        site = self._steer_defaults["site"]
        self._steering.add_item({"kind": "latent", "name": f"{site}/{latent}", "latent": latent, **self._steer_defaults,
                                 **self._steer_extra})
        return {"latent": latent, "items": len(self._steering.items)}

