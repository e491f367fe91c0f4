"""Sharded on-disk activation cache: cache.json, shard_NNNNN.safetensors, manifest.json; resumable and streamed.

A shard is listed in manifest.json only after its file is complete on disk (written tmp → fsync → rename), and
the manifest itself is replaced atomically, so a killed writer leaves at worst a temp file or an unlisted shard:
readers ignore both, and `create(..., resume=True)` deletes them and continues from the first unlisted shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from toolkit.config import CacheConfig
from toolkit.errors import CacheError, ShapeMismatchError, check_positive_int
from toolkit.io import (
    DTYPE_NAMES,
    DTYPES,
    MANIFEST,
    TMP_PREFIX,
    atomic_save_tensors,
    atomic_write_json,
    file_entry,
    sha256_file,
)
from toolkit.sites import Site
from toolkit.tracing.capture import check_mask, iter_capture
from toolkit.tracing.stream import stream_rows

if TYPE_CHECKING:
    from toolkit.models import Model

FORMAT = 1
CONFIG_FILE = "cache.json"
TOKEN_INDEX = "_token_index"
"""Tensor stored in every shard beside the sites: context * ctx_len + position of each row."""

def shard_name(i: int) -> str:
    """File name of shard `i`."""
    return f"shard_{i:05d}.safetensors"


def contexts_fingerprint(contexts: torch.Tensor, attention_mask: torch.Tensor | None = None) -> str:
    """sha256 of the token contexts (shape and int64 values) and, if given, of the attention mask."""
    h = hashlib.sha256(f"tokens{tuple(contexts.shape)}".encode())
    h.update(contexts.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    if attention_mask is not None:
        h.update(f"mask{tuple(attention_mask.shape)}".encode())
        h.update(attention_mask.detach().to("cpu", torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable ({e})") from e
    if not isinstance(obj, dict):
        raise CacheError(f"{path}: expected a JSON object")
    return obj


def _read_config(folder: Path) -> CacheConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CacheError(f"{folder}: not an activation cache (no {CONFIG_FILE})")
    raw = _read_json(path)
    if raw.pop("format", None) != FORMAT:
        raise CacheError(f"{path}: not a cache of format {FORMAT}")
    raw.pop("tokens_per_shard", None)
    try:
        return CacheConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CacheError(f"{path}: invalid cache config ({e})") from e


class ActivationCache:
    """A folder of activation shards; make one with `fill_cache`, read one with `ActivationCache.open`.

    `len(cache)` is the number of complete shards; rows are tokens, `n_tokens` in all.
    """

    def __init__(self, folder: Path, cfg: CacheConfig, shards: list[dict[str, Any]],
                 files: dict[str, dict[str, Any]]) -> None:
        self.folder, self.cfg = folder, cfg
        self._shards, self._files = shards, files
        self._offsets = [0]
        for s in shards:
            self._offsets.append(self._offsets[-1] + s["rows"])

    @classmethod
    def open(cls, folder: str | os.PathLike, *, verify: bool = True) -> ActivationCache:
        """Open a cache, listing only the shards its manifest records; `verify` checks their sha256 (sizes always)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CacheError(f"{folder}: no such cache folder")
        cfg = _read_config(folder)
        shards, files = cls._read_manifest(folder, cfg)
        cache = cls(folder, cfg, shards, files)
        cache.check(sha256=verify)
        return cache

    @classmethod
    def create(cls, folder: str | os.PathLike, cfg: CacheConfig, *, resume: bool = False) -> ActivationCache:
        """Start a cache in an empty folder, or with `resume=True` continue one made with an equal config."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise CacheError(f"{folder}: exists and is not a folder")
        entries = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        real = [e for e in entries if not e.startswith(TMP_PREFIX)]
        if entries and not resume:
            raise CacheError(f"{folder}: folder is not empty ({len(entries)} entries, e.g. {entries[0]!r}); "
                             "pass resume=True to continue the cache there, or choose an empty folder")
        if real and CONFIG_FILE not in real:
            raise CacheError(f"{folder}: not empty and not an activation cache (no {CONFIG_FILE}); "
                             "choose an empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        if CONFIG_FILE in real:
            old = _read_config(folder)
            for field, want in cfg.to_dict().items():
                have = old.to_dict()[field]
                if have != want:
                    raise CacheError(f"{folder}: cannot resume: {field} is {have!r} in {CONFIG_FILE} but "
                                     f"{want!r} now; use the same {field}, or choose an empty folder")
            shards, files = cls._read_manifest(folder, cfg)
        else:
            atomic_write_json(folder / CONFIG_FILE,
                              {"format": FORMAT, **cfg.to_dict(), "tokens_per_shard": cfg.tokens_per_shard})
            shards, files = [], {}
        cache = cls(folder, cfg, shards, files)
        cache.check(sha256=True)
        cache._write_manifest()
        # Leftovers of a killed writer: temp files, and shard files it had not yet listed (never trusted).
        for name in entries:
            if name.startswith(TMP_PREFIX) or (name.startswith("shard_") and name not in files):
                (folder / name).unlink(missing_ok=True)
        return cache

    @staticmethod
    def _read_manifest(folder: Path, cfg: CacheConfig) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        path = folder / MANIFEST
        if not path.is_file():  # created, killed before the first manifest: nothing complete yet
            return [], {}
        raw = _read_json(path)
        try:
            shards, files = list(raw["shards"]), dict(raw["files"])
            for i, s in enumerate(shards):
                if s["file"] != shard_name(i) or tuple(s["contexts"]) != cfg.shard_range(i) \
                        or s["file"] not in files or int(s["rows"]) < 0:
                    raise ValueError(f"entry {i} is {s}")
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CacheError(f"{path}: inconsistent manifest ({e}); delete the folder and fill it again") from e
        return shards, files

    def _write_manifest(self) -> None:
        atomic_write_json(self.folder / MANIFEST, {"format": FORMAT, "files": self._files, "shards": self._shards})

    def check(self, *, sha256: bool = True) -> None:
        """Check that every listed shard is present with its recorded size (and sha256); CacheError names the shard."""
        for s in self._shards:
            self._check_file(s["file"], sha256=sha256)

    def _check_file(self, name: str, *, sha256: bool) -> Path:
        path, want = self.folder / name, self._files[name]
        hint = "delete the folder and fill it again (resume cannot repair a listed shard)"
        if not path.is_file():
            raise CacheError(f"{path}: shard listed in the manifest but missing; {hint}")
        if path.stat().st_size != want["bytes"]:
            raise CacheError(f"{path}: shard is {path.stat().st_size} bytes, manifest says {want['bytes']} "
                             f"(truncated or replaced); {hint}")
        if sha256 and sha256_file(path) != want["sha256"]:
            raise CacheError(f"{path}: shard sha256 does not match the manifest (corrupt); {hint}")
        return path

    def write_shard(self, i: int, tensors: Mapping[str, torch.Tensor], token_index: torch.Tensor) -> None:
        """Write shard `i` (the next one) atomically: one `(rows, d)` tensor per site, then list it in the manifest."""
        if i != len(self._shards):
            raise CacheError(f"{self.folder}: shards are written in order; next is {len(self._shards)}, got {i}")
        rows = int(token_index.numel())
        out = {TOKEN_INDEX: token_index.to(torch.int64).reshape(rows)}
        for site, d in zip(self.cfg.sites, self.cfg.d, strict=True):
            t = tensors.get(site)
            if t is None or tuple(t.shape) != (rows, d):
                raise ShapeMismatchError(f"shard {i}, site {site!r}: activations {t if t is None else tuple(t.shape)}, "
                                         f"expected ({rows}, {d})")
            out[site] = t.to(DTYPES[self.cfg.dtype])
        start, stop = self.cfg.shard_range(i)
        name = shard_name(i)
        # One metadata key: safetensors writes several in random order, and equal shards should be equal bytes.
        meta = {"toolkit_cache": json.dumps({"format": FORMAT, "contexts": [start, stop], "rows": rows})}
        atomic_save_tensors(self.folder / name, out, metadata=meta)
        self._files[name] = file_entry(self.folder / name)
        self._shards.append({"file": name, "rows": rows, "contexts": [start, stop]})
        self._offsets.append(self._offsets[-1] + rows)
        self._write_manifest()

    def __len__(self) -> int:
        return len(self._shards)

    def __repr__(self) -> str:
        return (f"ActivationCache({str(self.folder)!r}, model={self.cfg.model!r}, sites={list(self.sites)}, "
                f"shards={len(self)}/{self.cfg.n_shards}, n_tokens={self.n_tokens})")

    @property
    def sites(self) -> tuple[str, ...]:
        return self.cfg.sites

    @property
    def d(self) -> int:
        """Width of the stored activations (all sites must share it; else use `width(site)`)."""
        if len(set(self.cfg.d)) != 1:
            raise CacheError(f"sites have different widths {dict(zip(self.sites, self.cfg.d, strict=True))}; "
                             "use cache.width(site)")
        return self.cfg.d[0]

    def width(self, site: str | Site | None = None) -> int:
        """Width of one site's activations."""
        return self.cfg.d[self.cfg.sites.index(self.resolve_site(site))]

    @property
    def offsets(self) -> list[int]:
        """Global row id of each complete shard's first row, then the total row count."""
        return list(self._offsets)

    @property
    def n_tokens(self) -> int:
        """Rows (tokens) in the complete shards."""
        return self._offsets[-1]

    @property
    def shard_rows(self) -> list[int]:
        """Rows in each complete shard."""
        return [s["rows"] for s in self._shards]

    @property
    def n_contexts_done(self) -> int:
        """Contexts covered by the complete shards."""
        return self._shards[-1]["contexts"][1] if self._shards else 0

    @property
    def complete(self) -> bool:
        """Whether every planned shard is written."""
        return len(self._shards) == self.cfg.n_shards

    def resolve_site(self, site: str | Site | None) -> str:
        """The stored site name for `site` (None: the only site); CacheError naming the sites held otherwise."""
        if site is None:
            if len(self.sites) != 1:
                raise CacheError(f"this cache holds several sites {list(self.sites)}; pass site=...")
            return self.sites[0]
        name = Site.parse(site).name
        if name not in self.sites:
            raise CacheError(f"site {name!r} is not in this cache; it holds {list(self.sites)}")
        return name

    def read(self, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors `keys` of shard `i`, as stored."""
        if not 0 <= i < len(self._shards):
            raise IndexError(f"shard {i} out of range: {len(self._shards)} complete shards")
        path = self._check_file(self._shards[i]["file"], sha256=False)
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, KeyError, RuntimeError) as e:
            raise CacheError(f"{path}: cannot read shard ({e}); delete the folder and fill it again") from e

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        """Shard `i` as `{site: (rows, d)}` in the stored dtype."""
        return self.read(i, self.sites)

    def token_positions(self, i: int) -> torch.LongTensor:
        """`(rows, 2)` (context row, position) of each row of shard `i`, to map activations back to tokens."""
        flat = self.read(i, [TOKEN_INDEX])[TOKEN_INDEX]
        return torch.stack([flat // self.cfg.ctx_len, flat % self.cfg.ctx_len], dim=1)

    def n_batches(self, batch_size: int, *, drop_last: bool = True) -> int:
        """Batches one pass of `iter_batches` yields."""
        return self.n_tokens // batch_size if drop_last else -(-self.n_tokens // batch_size)

    def iter_batches(self, batch_size: int, *, site: str | Site | None = None, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = True, buffer_shards: int = 2, start_batch: int = 0,
                     dtype: torch.dtype | None = torch.float32) -> Iterator[torch.Tensor]:
        """One pass over the rows as `(batch_size, d)` tensors, shuffled across a buffer of shards.

        Deterministic given `seed`; memory holds `buffer_shards` shards. `start_batch=k` yields exactly what a
        full pass yields from its k-th batch on (resume a training run there). `dtype=None` keeps the stored one.
        """
        batches = stream_rows([(self, self.resolve_site(site))], batch_size, shuffle, seed, drop_last, buffer_shards,
                          start_batch, dtype)
        return (batch for (batch,) in batches)


CaptureFn = Callable[..., Iterable[tuple[int, Mapping[str, torch.Tensor]]]]


def _cache_config(model: Model, sites: list[Site], contexts: torch.Tensor, attention_mask: torch.Tensor | None,
                  shard_contexts: int, dtype: torch.dtype, keep_bos: bool) -> CacheConfig:
    """The CacheConfig of a fill, after checking the contexts, the mask and the dtype."""
    if contexts.ndim != 2 or contexts.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"contexts must be an integer tensor (n, ctx_len), got {contexts.dtype} {tuple(contexts.shape)}")
    if attention_mask is not None and attention_mask.shape != contexts.shape:
        raise ShapeMismatchError(f"attention_mask {tuple(attention_mask.shape)} must match contexts "
                                 f"{tuple(contexts.shape)}")
    dtype_name = DTYPE_NAMES.get(dtype)
    if dtype_name is None:
        raise ValueError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16; got {dtype}")
    n, ctx = contexts.shape
    bos_id = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    return CacheConfig(model=model.name, sites=tuple(s.name for s in sites),
                       d=tuple(model.site_width(s) for s in sites), ctx_len=ctx, n_contexts=n,
                       fingerprint=contexts_fingerprint(contexts, attention_mask), shard_contexts=shard_contexts,
                       dtype=dtype_name, keep_bos=keep_bos, bos_token_id=None if bos_id is None else int(bos_id))


def _check_batch(acts: Mapping[str, torch.Tensor], cfg: CacheConfig) -> int:
    """Rows of one captured batch, after checking every site's shape."""
    b = None
    for name, d in zip(cfg.sites, cfg.d, strict=True):
        t = acts.get(name)
        if t is None or t.ndim != 3 or t.shape[1:] != (cfg.ctx_len, d) or (b is not None and t.shape[0] != b):
            got = None if t is None else tuple(t.shape)
            raise ShapeMismatchError(f"capture gave {name!r} with shape {got}; expected (batch, {cfg.ctx_len}, {d})")
        b = t.shape[0]
    return b


def fill_cache(model: Model, site_or_sites: str | Site | Sequence[str | Site], contexts: torch.Tensor,
               folder: str | os.PathLike, *, batch_size: int = 8, shard_contexts: int = 64,
               dtype: torch.dtype = torch.float32, resume: bool = False, progress: bool = True,
               attention_mask: torch.Tensor | None = None, keep_bos: bool = False,
               capture_fn: CaptureFn = iter_capture) -> ActivationCache:
    """Capture activations of `contexts` at the site(s) into a sharded cache in `folder`; resumable.

    Rows are real tokens only (BOS and padding dropped unless `keep_bos`). `dtype=torch.bfloat16` halves the disk.
    `capture_fn` has the signature of `iter_capture` (tests pass synthetic ones).
    """
    check_positive_int(batch_size, "batch_size")  # before the folder is made
    raw_sites = [site_or_sites] if isinstance(site_or_sites, (str, Site)) else list(site_or_sites)
    sites = [model.site(s) for s in raw_sites]
    if attention_mask is not None:
        check_mask(attention_mask, contexts)
    cfg = _cache_config(model, sites, contexts, attention_mask, shard_contexts, dtype, keep_bos)
    cache = ActivationCache.create(folder, cfg, resume=resume)
    if cache.complete:
        return cache
    names, (n, ctx) = cfg.sites, contexts.shape
    keep = torch.ones(n, ctx, dtype=torch.bool) if attention_mask is None else attention_mask.to("cpu", torch.bool)
    if not keep_bos and cfg.bos_token_id is not None:
        keep = keep & (contexts.cpu() != cfg.bos_token_id)
    positions = torch.arange(ctx)
    pending: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    pending_idx: list[torch.Tensor] = []
    row = start = cache.n_contexts_done
    for offset, acts in capture_fn(model, contexts, sites, batch_size=batch_size, attention_mask=attention_mask,
                                   progress=progress, desc=f"caching {', '.join(names)}", start=start):
        if offset != row:
            raise CacheError(f"capture yielded rows from {offset}, expected {row}")
        b = _check_batch(acts, cfg)
        while row < offset + b:  # split the batch at shard boundaries
            shard = len(cache)
            stop = min(offset + b, cfg.shard_range(shard)[1])
            m = keep[row:stop]
            for name in names:
                pending[name].append(acts[name][row - offset:stop - offset][m].to(DTYPES[cfg.dtype]))
            pending_idx.append((torch.arange(row, stop)[:, None] * ctx + positions)[m])
            row = stop
            if stop == cfg.shard_range(shard)[1]:
                cache.write_shard(shard, {k: torch.cat(v) for k, v in pending.items()}, torch.cat(pending_idx))
                pending, pending_idx = {name: [] for name in names}, []
    if not cache.complete:
        raise CacheError(f"capture stopped at context {row} of {n}; {len(cache)} of {cfg.n_shards} shards are "
                         "complete; call fill_cache(..., resume=True) to continue")
    return cache
