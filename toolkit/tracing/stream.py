"""Streaming readers over activation caches: a seeded shuffle buffer across shards, and row-aligned pairs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from toolkit.errors import CacheError, ShapeMismatchError
from toolkit.io import DTYPES
from toolkit.sites import Site

if TYPE_CHECKING:
    from toolkit.tracing.cache import ActivationCache


def paired_batches(cache_a: ActivationCache, cache_b: ActivationCache, batch_size: int, *,
                   site_a: str | Site | None = None, site_b: str | Site | None = None, shuffle: bool = True,
                   seed: int = 0, drop_last: bool = True, buffer_shards: int = 2, start_batch: int = 0,
                   dtype: torch.dtype | None = torch.float32) -> Iterator[torch.Tensor]:
    """Row-aligned `(batch_size, 2, d)` batches from two caches of the same tokens (e.g. base and chat model).

    Refuses caches whose token fingerprints, row layout or widths differ. Arguments as in `iter_batches`.
    """
    a_name, b_name = cache_a.resolve_site(site_a), cache_b.resolve_site(site_b)
    both = f"caches {str(cache_a.folder)!r} and {str(cache_b.folder)!r}"
    for field in ("fingerprint", "ctx_len", "n_contexts", "shard_contexts", "keep_bos", "bos_token_id"):
        a, b = getattr(cache_a.cfg, field), getattr(cache_b.cfg, field)
        if a != b:
            raise CacheError(f"{both} differ in {field} ({a!r} vs {b!r}): their rows are not the same tokens")
    if cache_a.shard_rows != cache_b.shard_rows:
        raise CacheError(f"{both} have different row counts ({cache_a.n_tokens} in {len(cache_a)} shards vs "
                         f"{cache_b.n_tokens} in {len(cache_b)}); finish filling both (fill_cache(..., resume=True))")
    if cache_a.width(a_name) != cache_b.width(b_name):
        raise ShapeMismatchError(f"site {a_name!r} has width {cache_a.width(a_name)} but site {b_name!r} has "
                                 f"{cache_b.width(b_name)}; paired batches need equal widths")
    batches = stream_rows([(cache_a, a_name), (cache_b, b_name)], batch_size, shuffle, seed, drop_last, buffer_shards,
                      start_batch, dtype)
    return (torch.stack([a, b.to(a.dtype)], dim=1) for a, b in batches)


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (1 << 63))


def stream_rows(sources: list[tuple[ActivationCache, str]], batch_size: int, shuffle: bool, seed: int, drop_last: bool,
            buffer_shards: int, start_batch: int, dtype: torch.dtype | None) -> Iterator[list[torch.Tensor]]:
    """Shuffle-buffer reader shared by iter_batches and paired_batches; every source has the same row layout.

    Shards are visited in a seeded order, `buffer_shards` at a time; each group's rows plus the previous group's
    leftover (< batch_size rows) are permuted and cut into batches. Row ids are tracked without loading data,
    so batches before `start_batch` cost no disk reads.
    """
    for name, v, low in (("batch_size", batch_size, 1), ("buffer_shards", buffer_shards, 1),
                         ("start_batch", start_batch, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return _batches(sources, batch_size, shuffle, seed, drop_last, buffer_shards, start_batch, dtype)


def _batches(sources: list[tuple[ActivationCache, str]], batch_size: int, shuffle: bool, seed: int, drop_last: bool,
             buffer_shards: int, start_batch: int, dtype: torch.dtype | None) -> Iterator[list[torch.Tensor]]:
    offsets = sources[0][0].offsets
    n = len(offsets) - 1

    def cast(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return xs if dtype is None else [x.to(dtype) for x in xs]

    def gather(ids: torch.Tensor) -> list[torch.Tensor]:  # rows by global id, one shard in memory at a time
        out = [torch.empty(len(ids), c.width(s), dtype=DTYPES[c.cfg.dtype]) for c, s in sources]
        shard_of = torch.searchsorted(torch.tensor(offsets), ids, right=True) - 1
        for i in torch.unique(shard_of).tolist():
            sel = (shard_of == i).nonzero().squeeze(1)
            for o, (c, s) in zip(out, sources, strict=True):
                o[sel] = c.read(i, [s])[s][ids[sel] - offsets[i]]
        return out

    order = torch.randperm(n, generator=_generator(seed, 0)).tolist() if shuffle else list(range(n))
    carry_ids = torch.empty(0, dtype=torch.long)
    carry: list[torch.Tensor] | None = gather(carry_ids)  # data of carry_ids; None while skipping to start_batch
    done = 0  # batches yielded or skipped so far
    for g, first in enumerate(range(0, n, buffer_shards)):
        group = order[first:first + buffer_shards]
        ids = torch.cat([carry_ids] + [torch.arange(offsets[i], offsets[i + 1]) for i in group])
        perm = torch.randperm(len(ids), generator=_generator(seed, g + 1)) if shuffle else torch.arange(len(ids))
        nb = len(ids) // batch_size
        if done + nb <= start_batch:  # nothing to yield from this group: follow the row ids only
            carry_ids, carry, done = ids[perm[nb * batch_size:]], None, done + nb
            continue
        if carry is None:
            carry = gather(carry_ids)
        # The buffer stays in shard order; each batch gathers its rows (no second, permuted copy of the buffer).
        data = [torch.cat([x, *(c.read(i, [s])[s] for i in group)]) for x, (c, s) in zip(carry, sources, strict=True)]
        for b in range(max(start_batch - done, 0), nb):
            rows = perm[b * batch_size:(b + 1) * batch_size]
            yield cast([x.index_select(0, rows) for x in data])
        done += nb
        rest = perm[nb * batch_size:]
        carry_ids, carry = ids[rest], [x.index_select(0, rest) for x in data]
    if not drop_last and len(carry_ids) and done >= start_batch:
        yield cast(carry if carry is not None else gather(carry_ids))
