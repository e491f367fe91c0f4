"""Deterministic fixture backends for the widget tests (Python and browser): arrays and callables shaped like
the analysis side's (see the widgets' docstrings), computed from the latent index so every test can predict
what the page must show."""

from __future__ import annotations

import threading
import time

import numpy as np

VOCAB = ["apple", "river", "stone", "music", "window", "paper", "cloud", "engine", "garden", "silver", "forest"]
CTX_LEN, N_TOP = 8, 5


def densities(n: int) -> np.ndarray:
    """Every 7th latent dead; the rest spread over 1e-5 .. 0.5 (log-uniform by a fixed rule)."""
    i = np.arange(n)
    d = 10.0 ** (-5 + 4.7 * ((i * 2654435761) % 1000) / 1000)
    d[i % 7 == 0] = 0.0
    return d.astype(np.float32)


def context(latent: int, k: int) -> dict:
    """Context k of a latent: CTX_LEN tokens holding two words of VOCAB (by latent % 11 and latent // 11 % 11),
    the peak at position (latent + k) % CTX_LEN."""
    a, b = VOCAB[latent % len(VOCAB)], VOCAB[latent // len(VOCAB) % len(VOCAB)]
    words = [" the", f" {a}", " of", " the", f" {b}", " and", " in", " a"]
    peak = (latent + k) % CTX_LEN
    acts = [round(0.1 * ((j * 3 + k) % 5), 3) for j in range(CTX_LEN)]
    acts[peak] = 2.0 + latent % 10 - 0.1 * k
    return {"tokens": words, "acts": acts}


class FeatureBackend:
    """Stands in for a FeatureStore: density, max_act, latent_details, search; plus text_fn."""

    def __init__(self, n: int = 65_536) -> None:
        self.n = n
        self.density = densities(n)
        self.max_act = (2.0 + np.arange(n) % 10).astype(np.float32)
        self.labels = [VOCAB[i % len(VOCAB)] for i in range(n)]
        self.calls: list[int] = []

    def latent_details(self, i: int) -> dict:
        self.calls.append(i)
        counts = [(i + b) % 9 + (5 if b == 2 else 0) for b in range(12)]
        return {"latent": i, "density": float(self.density[i]), "max_act": float(self.max_act[i]),
                "hist": {"edges": np.linspace(0, float(self.max_act[i]), 13), "counts": np.array(counts)},
                "top": [context(i, k) for k in range(N_TOP)],
                "quantiles": [{"label": "quantile 50–75%", "examples": [context(i + 1, 0)]}],
                "promoted": [[f" {VOCAB[(i + r) % len(VOCAB)]}{r}", 3.0 - 0.2 * r] for r in range(10)],
                "suppressed": [[f" not{r}", -2.0 + 0.1 * r] for r in range(10)],
                "neighbours": [[(i + 1) % self.n, 0.9], [(i + 100) % self.n, 0.5], [(i * 3) % self.n, 0.2]]}

    def search(self, query: str, by: str) -> np.ndarray:
        q = query.strip().lower()
        idx = np.arange(self.n)
        if by == "token":  # a latent promotes its label's word
            return idx[[q in lab for lab in self.labels]]
        hits = [v for v, w in enumerate(VOCAB) if q in w]  # see context(): two words per latent
        keep = np.isin(idx % len(VOCAB), hits) | np.isin(idx // len(VOCAB) % len(VOCAB), hits)
        return idx[keep]

    def text_fn(self, text: str) -> dict:
        tokens = text.split(" ")
        tokens = [t if j == 0 else " " + t for j, t in enumerate(tokens)]
        return {"tokens": tokens,
                "latents": [[((len(t) * 977 + j) % self.n, 1.5 - 0.1 * j), ((len(t) * 31) % self.n, 0.5)]
                            for j, t in enumerate(tokens)]}


KNOWN = 5  # the diff fixture's latent with an isolated Latent Scaling point


def diff_arrays(n: int = 4096) -> dict:
    """A DiffTable-like set of arrays: classes by the paper's bands, Latent Scaling defined for 'ft-only'."""
    from toolkit.analysis.diff import classify

    i = np.arange(n)
    nd = ((i * 7919) % 1000) / 999.0
    cls = classify(nd)
    ft = cls == "ft-only"
    nu_e = np.where(ft, 0.15 + 0.25 * ((i * 13) % 100) / 100, np.nan)
    nu_r = np.where(ft, 0.1 + 0.3 * ((i * 29) % 100) / 100, np.nan)
    art = ft & (((i * 13) % 100) > 80)
    nu_e[art] += 0.6
    nd[KNOWN] = 0.97
    cls[KNOWN] = "ft-only"
    nu_e[KNOWN], nu_r[KNOWN], art[KNOWN] = 1.25, 1.2, True
    freq = ((i * 31) % 97) / 970.0
    return {"norm_diff": nd, "cls": cls, "nu_error": nu_e, "nu_recon": nu_r, "artifact": art, "freq": freq}


class DiffTableLike:
    """Has the attributes ModelDiffExplorer.from_table reads."""

    def __init__(self, n: int = 4096) -> None:
        for k, v in diff_arrays(n).items():
            setattr(self, k, v)


def diff_details(latent: int) -> dict:
    base = [context(latent, k) for k in range(3)]
    ft = [{"tokens": c["tokens"], "acts": [a * (1 + 0.5 * (j % 2)) for j, a in enumerate(c["acts"])]} for c in base]
    return {"base": base, "ft": ft,
            "lens": {"promoted": [[f" up{r}", 1.0 - 0.1 * r] for r in range(8)],
                     "suppressed": [[f" down{r}", -1.0 + 0.1 * r] for r in range(8)]}}


def fake_generate(items: list[dict], prompt: str, delay: float = 0.0, cancel: threading.Event | None = None) -> dict:
    """Unsteered: a fixed continuation. Steered: words change with the summed strength (same when it is 0)."""
    end = time.monotonic() + delay
    while time.monotonic() < end:
        if cancel is not None and cancel.is_set():
            return {"unsteered": "", "steered": "cancelled"}
        time.sleep(0.02)
    base = f"{prompt} the cat sat on the mat and looked at the door."
    total = sum(i["strength"] for i in items if i["method"] != "ablate")
    if total == 0:
        return {"unsteered": base, "steered": base}
    return {"unsteered": base, "steered": f"{prompt} the dog{int(round(total))} sat on the rug and looked at the door."}


def fake_to_code(items: list[dict], prompt: str) -> str:
    return ("from tests.widgets.backends import fake_generate\n"
            f"items = {items!r}\n"
            f"print(fake_generate(items, {prompt!r})['steered'])\n")


def fake_sweep(items: list[dict], prompt: str, strengths: list[float]) -> list[dict]:
    rows = []
    for s in strengths:
        scaled = [dict(items[0], strength=s), *items[1:]] if items else []
        r = fake_generate(scaled, prompt)
        rows.append({"strength": s, "steered": r["steered"], "same": r["steered"] == r["unsteered"]})
    return rows


STEER_ITEMS = [
    {"kind": "latent", "name": "123", "site": "blocks.6.resid_post", "strength": 0.0, "min": -100.0, "max": 100.0,
     "method": "add", "positions": "all"},
    {"kind": "vector", "name": "diffmean:formal", "site": "blocks.6.resid_post", "strength": 0.0, "min": -20.0,
     "max": 20.0, "method": "add", "positions": "generated"},
]
