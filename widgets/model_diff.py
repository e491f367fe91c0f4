"""Model-diff explorer for a crosscoder: decoder-norm-difference histogram with a brush, Latent Scaling scatter
coloured by class, class chips with counts, and the selected latent's base and fine-tune contexts side by side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

CLASSES = ("base-only", "shared", "ft-only", "other")
ARTIFACT = "artifact"


class ModelDiffExplorer(Widget):
    """Explore n crosscoder latents: per-latent arrays go to the page once as bytes; `details(latent)` ->
    {"base": [ctx], "ft": [ctx], "lens": {title: [(token, value)], ...}} is called on selection (e.g.
    {"promoted": ..., "suppressed": ...}; toolkit.analysis.diff_view.DiffDetails builds it)."""

    _esm = esm("model_diff")
    _css = css("model_diff")

    n_latents = t.Int(0).tag(sync=True)
    norm_diff = t.Bytes(b"").tag(sync=True)
    nu_error = t.Bytes(b"").tag(sync=True)
    nu_recon = t.Bytes(b"").tag(sync=True)
    valid = t.Bytes(b"").tag(sync=True)
    kind = t.Bytes(b"").tag(sync=True)
    kind_names = t.List(t.Unicode()).tag(sync=True)
    artifact = t.Bytes(b"").tag(sync=True)
    freq = t.Bytes(b"").tag(sync=True)
    selected = t.Int(-1).tag(sync=True)
    brush = t.List(t.Float()).tag(sync=True)
    """[lo, hi] of norm_diff kept by the histogram brush ([] = no brush)."""
    classes = t.List(t.Unicode()).tag(sync=True)
    """Class chips switched on ([] = every class); 'artifact' selects flagged latents."""
    title = t.Unicode("").tag(sync=True)

    def __init__(self, norm_diff: Any, kind: Any, *, kind_names: Sequence[str] = CLASSES, nu_error: Any = None,
                 nu_recon: Any = None, valid: Any = None, artifact: Any = None, freq: Any = None,
                 details: Callable[[int], dict] | None = None, title: str = "",
                 max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        nd = finite_array(norm_diff, "norm_diff")
        n = len(nd)
        if n == 0:
            raise PayloadError("norm_diff is empty: a model-diff explorer needs at least one latent")
        names = [str(k) for k in kind_names]
        codes = _codes(kind, names, n)
        zeros = np.zeros(n, np.float32)
        nu_e = zeros if nu_error is None else finite_array(nu_error, "nu_error", n=n)
        nu_r = zeros if nu_recon is None else finite_array(nu_recon, "nu_recon", n=n)
        ok = np.zeros(n, bool) if nu_error is None else (
            np.ones(n, bool) if valid is None else finite_array(valid, "valid", dtype=bool, n=n))
        art = np.zeros(n, bool) if artifact is None else finite_array(artifact, "artifact", dtype=bool, n=n)
        fq = zeros if freq is None else finite_array(freq, "freq", n=n)
        if details is not None and not callable(details):
            raise TypeError(f"details must be callable, got {type(details).__name__}")
        self._details = details
        self._codes, self._art, self._nd = codes, art, nd
        super().__init__(max_bytes=max_bytes)
        self._check_state_size(nd, nu_e, nu_r, ok, codes, art, fq)
        with self.hold_sync():
            self.n_latents, self.kind_names, self.title = n, names, title
            self.norm_diff, self.nu_error, self.nu_recon = nd.tobytes(), nu_e.tobytes(), nu_r.tobytes()
            self.valid, self.kind = ok.astype(np.uint8).tobytes(), codes.tobytes()
            self.artifact, self.freq = art.astype(np.uint8).tobytes(), fq.tobytes()

    @classmethod
    def from_table(cls, table: Any, details: Callable[[int], dict] | None = None, **kwargs: Any) -> ModelDiffExplorer:
        """An explorer over a `toolkit.analysis.diff.DiffTable` (norm_diff, cls, nu_error, nu_recon, artifact,
        freq); undefined Latent Scaling ratios (NaN) are sent as 0 with valid=False."""
        for attr in ("norm_diff", "cls", "nu_error", "nu_recon", "artifact", "freq"):
            if not hasattr(table, attr):
                raise TypeError(f"from_table needs a DiffTable; {type(table).__name__} has no {attr!r}")
        nu_e, nu_r = np.asarray(table.nu_error, float), np.asarray(table.nu_recon, float)
        ok = np.isfinite(nu_e) & np.isfinite(nu_r)
        return cls(np.asarray(table.norm_diff), np.asarray(table.cls), nu_error=np.where(ok, nu_e, 0.0),
                   nu_recon=np.where(ok, nu_r, 0.0), valid=ok, artifact=np.asarray(table.artifact),
                   freq=np.nan_to_num(np.asarray(table.freq, float), nan=0.0), details=details, **kwargs)

    def __repr__(self) -> str:
        return f"ModelDiffExplorer({self.n_latents} latents, selected={self.selected})"

    @t.validate("selected")
    def _check_selected(self, proposal: Any) -> int:
        v = proposal["value"]
        return -1 if v == -1 else check_latent(v, self.n_latents, "selected")

    @t.validate("brush")
    def _check_brush(self, proposal: Any) -> list[float]:
        b = list(proposal["value"])
        if b and (len(b) != 2 or not np.isfinite(b).all() or b[0] > b[1]):
            raise ValueError(f"brush must be [] or [lo, hi] with lo <= hi, got {b}")
        return b

    @t.validate("classes")
    def _check_classes(self, proposal: Any) -> list[str]:
        bad = [c for c in proposal["value"] if c not in (*self.kind_names, ARTIFACT)]
        if bad:
            raise ValueError(f"unknown classes {bad}; valid: {[*self.kind_names, ARTIFACT]}")
        return list(proposal["value"])

    def counts(self) -> dict[str, int]:
        """Latents per class and flagged artifacts (what the chips show)."""
        return {**{k: int((self._codes == i).sum()) for i, k in enumerate(self.kind_names)},
                ARTIFACT: int(self._art.sum())}

    def visible(self) -> np.ndarray:
        """Latents that pass the brush and the class chips (what the page lists)."""
        keep = np.ones(self.n_latents, bool)
        if self.brush:
            keep &= (self._nd >= self.brush[0]) & (self._nd <= self.brush[1])
        if self.classes:
            on = np.zeros(self.n_latents, bool)
            for c in self.classes:
                on |= self._art if c == ARTIFACT else self._codes == self.kind_names.index(c)
            keep &= on
        return np.nonzero(keep)[0]

    def _on_details(self, msg: dict) -> dict:
        latent = check_latent(msg.get("latent"), self.n_latents)
        if self._details is None:
            return {"latent": latent, "base": [], "ft": [], "lens": []}
        d = self._details(latent)
        if not isinstance(d, dict):
            raise PayloadError(f"details({latent}) must return a dict, got {type(d).__name__}")
        lens = d.get("lens") or {}
        if not isinstance(lens, dict):
            raise PayloadError(f"details({latent})['lens'] must be a dict of title -> [(token, value), ...]")
        return {"latent": latent, "base": contexts(d.get("base", []), f"details({latent})['base']"),
                "ft": contexts(d.get("ft", []), f"details({latent})['ft']"),
                "lens": [[str(title), pairs(rows)] for title, rows in lens.items()]}


def _codes(kind: Any, names: list[str], n: int) -> np.ndarray:
    """Class codes (int8) from codes or from class-name strings."""
    arr = np.asarray(kind)
    if arr.shape != (n,):
        raise PayloadError(f"kind must have one entry per latent ({n}), got shape {arr.shape}")
    if arr.dtype.kind in "OUS":
        lookup = {k: i for i, k in enumerate(names)}
        bad = sorted({str(x) for x in arr if str(x) not in lookup})
        if bad:
            raise PayloadError(f"kind has names {bad[:5]} not in kind_names {names}")
        return np.fromiter((lookup[str(x)] for x in arr), np.int8, n)
    codes = finite_array(arr, "kind", dtype=np.int8)
    if len(codes) and (codes.min() < 0 or codes.max() >= len(names)):
        raise PayloadError(f"kind codes must be in 0..{len(names) - 1} (one per kind_names entry)")
    return codes
