"""`fill_cache`: capture activations of token contexts into a sharded ActivationCache, resumably."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from toolkit.config import CacheConfig
from toolkit.errors import CacheError, ShapeMismatchError, check_positive_int
from toolkit.io import DTYPE_NAMES, DTYPES
from toolkit.sites import Site
from toolkit.tracing.cache import ActivationCache, contexts_fingerprint
from toolkit.tracing.capture import check_mask, iter_capture

if TYPE_CHECKING:
    from toolkit.models import Model

CaptureFn = Callable[..., Iterable[tuple[int, Mapping[str, torch.Tensor]]]]


def cache_config(model: Model, sites: list[Site], contexts: torch.Tensor, attention_mask: torch.Tensor | None,
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
    cfg = cache_config(model, sites, contexts, attention_mask, shard_contexts, dtype, keep_bos)
    cache = ActivationCache.create(folder, cfg, resume=resume)
    try:
        _fill(cache, model, contexts, sites, batch_size, attention_mask, keep_bos, progress, capture_fn)
    finally:
        cache.close()
    return cache


def _fill(cache: ActivationCache, model: Model, contexts: torch.Tensor, sites: list[Site], batch_size: int,
          attention_mask: torch.Tensor | None, keep_bos: bool, progress: bool, capture_fn: CaptureFn) -> None:
    cfg = cache.cfg
    if cache.complete:
        return
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
