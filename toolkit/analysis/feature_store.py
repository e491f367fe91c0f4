"""A feature store: what every latent of an SAE does over a corpus, built once, browsed lazily.

`build_feature_store(model, sae, contexts, folder)` makes one streaming pass (resumable) and writes a folder of
.npy arrays; `FeatureStore.open(folder)` memory-maps them, so a latent's details are read in O(1) without
holding 65k latents' contexts in memory, and no model is needed to browse. Contexts are stored as token ids
with per-token activations, never as strings; a small vocabulary file maps the ids the store uses to text.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.analysis.feature_store_build import (
    STATE_FILE,
    StoreSettings,
    decoder_neighbours,
    finish_arrays,
    stream_stats,
)
from toolkit.analysis.features import logit_lens_ids
from toolkit.errors import (
    CacheError,
    CheckpointError,
    EmptyInputError,
    FeatureIndexError,
    check_finite,
    check_positive_int,
)
from toolkit.folders import lock_folder, make_dir, recover_folder, staged_folder
from toolkit.io import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    verify_manifest,
    write_manifest,
)
from toolkit.keys import model_fingerprint, stable_hash, tensors_fingerprint
from toolkit.paths import cache_dir
from toolkit.tracing import capture
from toolkit.tracing.cache import contexts_fingerprint

FORMAT = 1
META = "meta.json"
VOCAB = "vocab.json"

__all__ = ["FeatureStore", "StoreSettings", "build_feature_store", "token_latents"]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _check_contexts(contexts: Any) -> torch.Tensor:
    if not isinstance(contexts, torch.Tensor) or contexts.ndim != 2 or contexts.dtype not in (torch.int32, torch.int64):
        got = f"{type(contexts).__name__} {tuple(getattr(contexts, 'shape', ()))}"
        raise TypeError(f"contexts must be an integer token tensor (n_contexts, ctx_len), got {got}; "
                        "make one with toolkit.data.token_contexts")
    if contexts.shape[0] == 0 or contexts.shape[1] < 2:
        raise EmptyInputError(f"contexts of shape {tuple(contexts.shape)} hold no tokens besides BOS")
    return contexts.long().cpu()


def build_feature_store(model: Any, sae: Any, contexts: torch.Tensor, folder: str | Path | None = None, *,
                        site: str | None = None, settings: StoreSettings | None = None, batch_size: int | None = None,
                        checkpoint_every: int = 64, progress: bool = True) -> FeatureStore:
    """Build (or resume, or reopen) the feature store of `sae` over token `contexts` into `folder`.

    A complete store with the same settings and tokens is reopened; a partial one resumes from its last
    checkpoint; one built with other settings is refused (CacheError). `folder=None` keys the folder (in the user
    cache's feature_stores/) by a hash of everything the store depends on, so other inputs never meet it.
    `batch_size` defaults to what keeps the dense codes of a batch near 32 MB (their float64 sums and masks
    come on top; Binder's 2 GB).
    """
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    settings = settings or StoreSettings()
    contexts = _check_contexts(contexts)
    s = sae.check_compatible(model, site)
    n, ctx_len = contexts.shape
    # every SAE tensor and setting, and the model's weights: a store is reused only for exactly these
    sae_key = stable_hash([tensors_fingerprint(dict(sae.state_dict())), sae.cfg.to_dict()])[:16]
    meta = {"format": FORMAT, "model": getattr(model, "name", ""), "site": s.name, "sae": sae.name,
            "sae_fingerprint": sae_key, "model_fingerprint": model_fingerprint(model)[:16],
            "d_sae": sae.d_sae, "n_contexts": n, "ctx_len": ctx_len, "fingerprint": contexts_fingerprint(contexts),
            "settings": settings.to_json()}
    if folder is None:
        folder = cache_dir() / "feature_stores" / f"{s.name}-{n}x{ctx_len}-{stable_hash(meta)[:16]}"
    folder = Path(folder).expanduser()
    if (recover_folder(folder) / MANIFEST).exists():
        return _reopen(folder, meta)
    if batch_size is None:
        batch_size = max(1, min(32, (1 << 23) // (ctx_len * sae.d_sae)))
    with lock_folder(folder, "feature store"):
        _build(model, sae, s, contexts, folder, settings, meta, batch_size, checkpoint_every, progress)
    return FeatureStore.open(folder)


def _reopen(folder: Path, meta: dict[str, Any]) -> FeatureStore:
    done = read_json(folder / META, "feature store meta")
    if {k: done.get(k) for k in meta} != meta:
        raise CacheError(f"{folder}: holds a feature store built with other settings, tokens, SAE weights or model "
                         "weights; open it with FeatureStore.open, or build into another folder")
    return FeatureStore.open(folder)


def _build(model: Any, sae: Any, s: Any, contexts: torch.Tensor, folder: Path, settings: StoreSettings,
           meta: dict[str, Any], batch_size: int, checkpoint_every: int, progress: bool) -> None:
    """The streaming pass (resumable, in `folder`), then every array written into a staged folder swapped in."""
    t0 = time.perf_counter()
    make_dir(folder, "feature store")
    stats = stream_stats(model, sae, s, contexts, folder / STATE_FILE, settings, meta, batch_size=batch_size,
                         checkpoint_every=checkpoint_every, progress=progress)
    arrays = finish_arrays(stats)
    up_ids, up, down_ids, down = logit_lens_ids(sae, model, k=settings.lens_k)
    nb_ids, nb_cos = decoder_neighbours(sae.W_dec, settings.n_neighbours)
    arrays |= {"lens_up_ids": up_ids.int().numpy(), "lens_up": up.float().numpy(),
               "lens_down_ids": down_ids.int().numpy(), "lens_down": down.float().numpy(),
               "nb_ids": nb_ids.int().numpy(), "nb_cos": nb_cos.float().numpy(), "contexts": contexts.int().numpy()}
    used = np.union1d(np.unique(arrays["contexts"]), np.union1d(arrays["lens_up_ids"], arrays["lens_down_ids"]))
    strings = model.tokenizer.batch_decode([[int(i)] for i in used])
    meta = meta | {"n_tokens": int(stats.t["n_tokens"]), "window_len": stats.win,
                   "build_seconds": time.perf_counter() - t0}
    with staged_folder(folder) as tmp:  # the resume state is left behind with the old folder
        atomic_write_json(tmp / VOCAB, {"ids": used.tolist(), "strings": strings})
        for name, arr in arrays.items():
            _save_npy(tmp / f"{name}.npy", arr)
        atomic_write_json(tmp / META, meta)
        write_manifest(tmp, sorted([META, VOCAB] + [f"{k}.npy" for k in arrays]))


class FeatureStore:
    """A built feature store, memory-mapped: `density`, `max_act`, `latent_details(i)`, `search(query, by)`."""

    def __init__(self, folder: Path, meta: dict[str, Any], vocab: dict[int, str]) -> None:
        self.folder, self.meta, self._vocab = folder, meta, vocab
        self.settings = StoreSettings.from_json(meta["settings"])
        self._arrays: dict[str, np.ndarray] = {}
        self._texts: dict[str, list[str]] = {}
        self._listed: set[str] = set()

    @classmethod
    def open(cls, folder: str | Path) -> FeatureStore:
        """Open a complete store (its manifest present and file sizes as listed); arrays load on first use."""
        folder = recover_folder(Path(folder).expanduser())
        if not (folder / MANIFEST).is_file():
            raise CacheError(f"{folder}: no complete feature store here ({MANIFEST} missing); "
                             "build one with build_feature_store")
        try:  # the manifest must list every file, each inside the folder, with its size
            manifest = verify_manifest(folder, [META, VOCAB], complete=True, sha256=False)
        except CheckpointError as e:
            raise CacheError(f"{folder}: not a usable feature store: {e}") from e
        vocab = read_json(folder / VOCAB, "feature store vocabulary")
        store = cls(folder, read_json(folder / META, "feature store meta"),
                    dict(zip(vocab["ids"], vocab["strings"], strict=True)))
        store._listed = set(manifest["files"])
        return store

    def _a(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            if f"{name}.npy" not in self._listed:
                raise CacheError(f"{self.folder / MANIFEST}: does not list {name}.npy, which the store reads; "
                                 "rebuild the store with build_feature_store")
            self._arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    # ------------------------------------------------------------------ the contract's arrays

    @property
    def n_latents(self) -> int:
        return int(self.meta["d_sae"])

    def __len__(self) -> int:
        return self.n_latents

    @property
    def density(self) -> np.ndarray:
        """Firing fraction per latent over the corpus' non-BOS tokens, float32 (n_latents,)."""
        return np.asarray(self._a("density"), dtype=np.float32)

    @property
    def max_act(self) -> np.ndarray:
        """Largest activation seen per latent, float32 (n_latents,)."""
        return np.asarray(self._a("max_act"), dtype=np.float32)

    @property
    def labels(self) -> list[str]:
        """A short label per latent: its most promoted token (logit lens)."""
        return [self._vocab.get(int(i), "?") for i in self._a("lens_up_ids")[:, 0]]

    def check_latent(self, i: Any) -> int:
        """`i` as an int, or FeatureIndexError with the valid range."""
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise FeatureIndexError(f"latent must be an integer in 0..{self.n_latents - 1}, got {i!r}")
        if not 0 <= int(i) < self.n_latents:
            raise FeatureIndexError(f"latent {int(i)} is out of range: this store has latents 0..{self.n_latents - 1}")
        return int(i)

    # ------------------------------------------------------------------ one latent, O(1)

    def _contexts_of(self, prefix: str, i: int) -> list[dict[str, Any]]:
        ctx, start, acts = self._a(f"{prefix}_ctx")[i], self._a(f"{prefix}_start")[i], self._a(f"{prefix}_acts")[i]
        width, tokens = acts.shape[-1], self._a("contexts")
        return [{"tokens": [self._vocab.get(int(t), "?") for t in tokens[c, s:s + width]],
                 "acts": [float(a) for a in acts[j]]}
                for j, (c, s) in enumerate(zip(ctx.tolist(), start.tolist(), strict=True)) if c >= 0]

    def _quantiles(self, i: int) -> list[dict[str, Any]]:
        examples = self._contexts_of("sample", i)  # ascending by activation
        vals = [float(v) for v, c in zip(self._a("sample_act")[i], self._a("sample_ctx")[i], strict=True) if c >= 0]
        if not examples:
            return []
        bands = np.array_split(np.arange(len(examples)), min(self.settings.n_quantiles, len(examples)))
        n_q = len(bands)
        return [{"label": f"quantile {q + 1}/{n_q}: max act {vals[b[0]]:.3g}–{vals[b[-1]]:.3g}",
                 "examples": [examples[j] for j in b]} for q, b in reversed(list(enumerate(bands)))]

    def latent_details(self, latent: int) -> dict[str, Any]:
        """Everything the feature explorer shows for one latent (see the dict shape in the data contract)."""
        i = self.check_latent(latent)
        width, counts = float(self._a("hist_width")[i]), self._a("hist_counts")[i]
        edges = np.arange(len(counts) + 1, dtype=np.float32) * np.float32(width)
        lens = {name: [[self._vocab.get(int(t), "?"), float(v)]
                       for t, v in zip(self._a(f"lens_{key}_ids")[i], self._a(f"lens_{key}")[i], strict=True)]
                for name, key in (("promoted", "up"), ("suppressed", "down"))}
        return {"latent": i, "density": float(self._a("density")[i]), "max_act": float(self._a("max_act")[i]),
                "hist": {"edges": edges, "counts": np.asarray(counts, dtype=np.int64)},
                "top": self._contexts_of("top", i), "quantiles": self._quantiles(i), **lens,
                "neighbours": [[int(j), float(c)] for j, c in zip(self._a("nb_ids")[i], self._a("nb_cos")[i],
                                                                   strict=True)]}

    # ------------------------------------------------------------------ search

    def _search_texts(self, by: str) -> list[str]:
        if by not in self._texts:
            ids = np.fromiter(self._vocab, dtype=np.int64)
            lookup = np.full(int(ids.max()) + 1 if len(ids) else 1, "", dtype=object)
            lookup[ids] = [s.lower() for s in self._vocab.values()]
            if by == "token":
                toks = lookup[np.asarray(self._a("lens_up_ids"))]
                self._texts[by] = ["\n".join(row) for row in toks]
            else:
                self._texts[by] = self._context_texts(lookup)
        return self._texts[by]

    def _context_texts(self, lookup: np.ndarray, chunk: int = 4096) -> list[str]:
        ctx, start, width = self._a("top_ctx"), self._a("top_start"), self._a("top_acts").shape[-1]
        tokens, out = self._a("contexts"), []
        for lo in range(0, self.n_latents, chunk):
            c, s = np.asarray(ctx[lo:lo + chunk]), np.asarray(start[lo:lo + chunk])
            win = tokens[np.maximum(c, 0)[..., None], s[..., None] + np.arange(width)]  # (chunk, k, width)
            text = lookup[win]
            text[c < 0] = ""
            out += ["\n".join("".join(w) for w in row) for row in text]
        return out

    def search(self, query: str, by: str = "token") -> np.ndarray:
        """Latents whose promoted tokens (by="token") or top contexts (by="context") contain `query`
        (case-insensitive), strongest (max_act) first."""
        if by not in ("token", "context"):
            raise ValueError(f"search by must be 'token' or 'context', got {by!r}")
        if not isinstance(query, str) or not query.strip():
            return np.zeros(0, dtype=np.int64)
        q = query.lower() if by == "context" else query.strip().lower()
        hits = np.array([i for i, t in enumerate(self._search_texts(by)) if q in t], dtype=np.int64)
        return hits[np.argsort(-self.max_act[hits], kind="stable")] if len(hits) else hits

    def describe(self, latent: int, *, n_contexts: int = 3, n_tokens: int = 6) -> str:
        """A plain-text summary of one latent: stats, logit lens, neighbours and its strongest contexts, with the
        strongest token of each context in «guillemets»."""
        d = self.latent_details(latent)

        def ctx_line(c: dict[str, Any]) -> str:
            k = int(np.argmax(c["acts"]))
            text = "".join(f"«{t}»" if j == k else t for j, t in enumerate(c["tokens"])).replace("\n", "⏎")
            return f"    {c['acts'][k]:8.2f}  {text}"

        toks = ", ".join(repr(t) for t, _ in d["promoted"][:n_tokens])
        down = ", ".join(repr(t) for t, _ in d["suppressed"][:n_tokens])
        near = ", ".join(f"{j} ({c:.2f})" for j, c in d["neighbours"][:3])
        lines = [f"latent {d['latent']}: density {d['density']:.3%}, max act {d['max_act']:.3g}",
                 f"  promotes {toks}", f"  suppresses {down}", f"  nearest latents {near}", "  top contexts:"]
        lines += [ctx_line(c) for c in d["top"][:n_contexts]]
        if d["quantiles"]:
            q = d["quantiles"][-1]
            lines += [f"  weakest band ({q['label']}):"] + [ctx_line(c) for c in q["examples"][:1]]
        return "\n".join(lines)

    def __repr__(self) -> str:
        m = self.meta
        dead = int((self.density == 0).sum())
        return (f"FeatureStore({m['d_sae']} latents of {m['sae']} at {m['site']}, {m['n_contexts']} contexts × "
                f"{m['ctx_len']} tokens, {dead} dead; {self.folder})")


def token_latents(model: Any, sae: Any, text: str, k: int = 5, *, site: str | None = None) -> dict[str, Any]:
    """The `k` strongest latents of each token of `text` (BOS left out): {"tokens": [...], "latents": [[[i, act]]]}."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyInputError("token_latents needs some text; got an empty string")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    s = sae.check_compatible(model, site)
    acts = capture(model, text, s)
    x = acts[s][0]
    check_finite(x, f"activations at {s.name}")
    with torch.no_grad():
        codes = sae.encode(x.to(sae.device, sae.dtype)).float().cpu()
    ids = acts.input_ids[0]
    keep = ids != model.bos_token_id
    vals, idx = codes[keep].topk(min(k, sae.d_sae), dim=1)
    return {"tokens": model.tokenizer.batch_decode([[int(t)] for t in ids[keep]]),
            "latents": [[[int(j), float(v)] for v, j in zip(vr, ir, strict=True) if v > 0]
                        for vr, ir in zip(vals.tolist(), idx.tolist(), strict=True)]}
