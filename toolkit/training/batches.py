"""Where training batches come from, for SAEs and crosscoders alike.

`BatchStream` counts the batches it hands out (`position`), so a resumed run reopens its source at the same place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Union

import torch

from toolkit.crosscoder import PairedActivations
from toolkit.errors import EmptyInputError, ShapeMismatchError
from toolkit.tracing import ActivationCache, paired_batches

Source = Union[ActivationCache, str, os.PathLike, Callable[[int], Iterable[torch.Tensor]], Iterable[torch.Tensor]]
"""SAE training data: an ActivationCache (or its folder: epochs of shuffled batches, reshuffled each epoch), a
callable `source(start_batch)` returning an iterator of batches from batch `start_batch` on, or an iterable of
batches (on resume, its first `position` batches are skipped). Batches are (batch, d_in) tensors."""

PairedSource = Union[PairedActivations, torch.Tensor, tuple[ActivationCache, ActivationCache]]
"""Crosscoder training data: paired activations in memory, a (n, 2, d) tensor (untagged), or (base cache,
fine-tuned cache) of the same tokens; epochs are reshuffled with a seed per epoch."""


class BatchStream:
    """Batches of rows shaped `row_shape` from a source; `seek(position)` opens it there, `position` counts on."""

    def __init__(self, open_at: Callable[[int], Iterator[Any]], row_shape: tuple[int, ...], what: str) -> None:
        self._open_at, self.row_shape, self._what = open_at, row_shape, what
        self.position = 0
        self._it: Iterator[Any] = iter(())
        self._buffer: list[torch.Tensor] = []

    def seek(self, position: int) -> BatchStream:
        """Reopen the source so that the next batch is batch `position` of a full pass."""
        self.position, self._buffer = position, []
        self._it = self._open_at(position)
        return self

    def _pull(self) -> torch.Tensor | None:
        x = next(self._it, None)
        if x is None:
            return None
        x = torch.as_tensor(x)
        k = len(self.row_shape)
        if x.ndim < k + 1 or tuple(x.shape[-k:]) != self.row_shape or not x.is_floating_point():
            want = ", ".join(map(str, self.row_shape))
            raise ShapeMismatchError(f"training batches must be floating (batch, {want}) tensors ({self._what}); "
                                     f"got {x.dtype} {tuple(x.shape)}")
        return x.reshape(-1, *self.row_shape)

    def peek(self, n: int) -> list[torch.Tensor]:
        """The next n batches (fewer if the source ends), without consuming them."""
        while len(self._buffer) < n and (x := self._pull()) is not None:
            self._buffer.append(x)
        return self._buffer[:n]

    def next(self) -> torch.Tensor | None:
        x = self._buffer.pop(0) if self._buffer else self._pull()
        if x is not None:
            self.position += 1
        return x


def sae_stream(source: Source, d_in: int, batch_size: int, seed: int, site: str | None) -> BatchStream:
    """A BatchStream of (batch, d_in) rows for SAE training (see Source)."""
    if isinstance(source, (str, os.PathLike)):
        source = ActivationCache.open(source)
    if isinstance(source, ActivationCache):
        cache = source

        def open_at(start: int) -> Iterator[torch.Tensor]:
            return _cache_batches(cache, d_in, batch_size, seed, site, start)
    elif callable(source):
        def open_at(start: int) -> Iterator[torch.Tensor]:
            return iter(source(start))
    elif isinstance(source, Iterable):
        it = iter(source)

        def open_at(start: int) -> Iterator[torch.Tensor]:
            for _ in range(start):
                next(it, None)
            return it
    else:
        raise TypeError(f"source must be an ActivationCache, a cache folder, a callable source(start_batch) or an "
                        f"iterable of (batch, d_in) tensors; got {type(source).__name__}")
    return BatchStream(open_at, (d_in,), "d_in of the SAE")


def _cache_batches(cache: ActivationCache, d_in: int, batch_size: int, seed: int, site: str | None,
                   start: int) -> Iterator[torch.Tensor]:
    site = site if site in cache.sites else None
    width = cache.width(site)
    if width != d_in:
        raise ShapeMismatchError(f"the cache {cache.folder} holds {width}-wide activations, but the SAE has "
                                 f"d_in={d_in}")
    n = cache.n_batches(batch_size)
    if n == 0:
        raise ValueError(f"the cache {cache.folder} has {cache.n_tokens} tokens, less than one batch of "
                         f"{batch_size}")
    epoch, first = divmod(start, n)
    while True:  # epoch e is shuffled with seed + e
        yield from cache.iter_batches(batch_size, site=site, shuffle=True, seed=seed + epoch, start_batch=first)
        epoch, first = epoch + 1, 0


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (1 << 63)


def _batches_per_epoch(source: PairedSource, batch_size: int) -> int:
    if isinstance(source, tuple):
        per_epoch = source[0].n_batches(batch_size)
    else:
        per_epoch = (source.acts if isinstance(source, PairedActivations) else source).shape[0] // batch_size
    if per_epoch == 0:
        raise EmptyInputError(f"the source holds fewer rows than one batch of {batch_size}; pass more activations "
                              "or a smaller batch_size")
    return per_epoch


def iter_paired(source: PairedSource, batch_size: int, *, seed: int = 0, start: int = 0,
                site: str | None = None) -> Iterator[torch.Tensor]:
    """Endless `(batch_size, 2, d)` batches, reshuffled each epoch (seeded); `start=s` begins at batch s."""
    per_epoch = _batches_per_epoch(source, batch_size)
    data = None if isinstance(source, tuple) else source.acts if isinstance(source, PairedActivations) else source
    epoch, skip = divmod(start, per_epoch)
    while True:
        if isinstance(source, tuple):
            yield from paired_batches(source[0], source[1], batch_size, site_a=site, site_b=site,
                                      seed=_epoch_seed(seed, epoch), start_batch=skip)
        else:
            perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
            for b in range(skip, per_epoch):
                yield data[perm[b * batch_size:(b + 1) * batch_size]].float()
        epoch, skip = epoch + 1, 0


def paired_stream(source: PairedSource, d_in: int, batch_size: int, seed: int, site: str | None) -> BatchStream:
    """A BatchStream of (batch, 2, d_in) rows for crosscoder training (see PairedSource)."""
    _batches_per_epoch(source, batch_size)  # refuse a source smaller than one batch before any work
    return BatchStream(lambda start: iter_paired(source, batch_size, seed=seed, start=start, site=site),
                       (2, d_in), "two models, d_in of the crosscoder")
