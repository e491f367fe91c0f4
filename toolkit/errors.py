"""Errors raised by the toolkit: each names what was wrong and what would be right."""

from __future__ import annotations

import operator
from typing import Any


class ToolkitError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class ShapeMismatchError(ToolkitError, ValueError):
    """An SAE, vector or activation does not have the width its site has."""


class HookNotFoundError(ToolkitError, KeyError):
    """A site name or layer that the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class NonFiniteError(ToolkitError, FloatingPointError):
    """NaN or inf where finite numbers are required."""


class CheckpointError(ToolkitError, OSError):
    """A weights folder or checkpoint that is missing, truncated, corrupt or inconsistent."""


class FeatureIndexError(ToolkitError, IndexError):
    """A feature (latent) index outside `0 <= i < d_sae` or not an integer."""


class EmptyInputError(ToolkitError, ValueError):
    """A prompt or corpus with nothing to run on (empty, or only BOS)."""


class ContextLengthError(ToolkitError, ValueError):
    """A prompt longer than the model's context window, with truncation turned off."""


class ModelUnavailableError(ToolkitError, OSError):
    """Weights that cannot be found locally and cannot be downloaded (offline, gated, missing)."""


class RemoteUnavailableError(ModelUnavailableError):
    """A remote (NDIF) trace that cannot run: no API key, no network, the service refused or failed the job."""


class CacheError(ToolkitError, OSError):
    """An activation cache folder that is inconsistent with what was asked of it."""


class ArgumentError(ToolkitError, ValueError):
    """An argument the toolkit cannot use (a batch size, mask, token id, dtype/device name, padding side...)."""


class FolderLockedError(ToolkitError, OSError):
    """An output folder that another writer (process) holds the lock of."""


class DeviceUnavailableError(ArgumentError, RuntimeError):
    """A device (e.g. "cuda") that this machine does not have, or a device string torch does not know."""


class SiteMismatchError(ToolkitError, ValueError):
    """An SAE or crosscoder asked to read a site other than the one its config says it was trained on."""


class NestedTraceError(ToolkitError, RuntimeError):
    """A toolkit call that would open a trace inside another trace (or from inside an edit's function)."""


class ToolkitWarning(UserWarning):
    """Base class of the toolkit's warnings."""


class ModelMismatchWarning(ToolkitWarning):
    """An SAE or crosscoder used with a model other than the one its config records (same width)."""


def check_index(i: object, n: int, what: str = "index", owner: str = "") -> int:
    """`i` as an int if it is an integer in 0..n-1, else FeatureIndexError naming `what`, `owner` and the valid range."""
    where = f" for {owner}" if owner else ""
    if isinstance(i, bool) or not hasattr(i, "__index__"):
        raise FeatureIndexError(f"{what} must be an integer in 0..{n - 1}{where}; got {i!r} ({type(i).__name__})")
    idx = operator.index(i)
    if not 0 <= idx < n:
        raise FeatureIndexError(f"{what} {idx} is out of range{where}: valid indices are 0..{n - 1}")
    return idx


def check_positive_int(n: object, what: str) -> int:
    """`n` as an int if it is a positive integer, else ArgumentError naming `what` (checked before any work)."""
    if isinstance(n, bool) or not hasattr(n, "__index__") or operator.index(n) < 1:
        raise ArgumentError(f"{what} must be a positive integer (e.g. 8), got {n!r}")
    return operator.index(n)


def check_finite(x: Any, what: str) -> Any:
    """`x` (a tensor or array) unchanged if every value is finite, else NonFiniteError naming `what` and the count.

    One reduction over the tensor (a finite sum proves finiteness; else one `isfinite(...).all()`); the values
    are counted only when something is wrong. Integer data passes.
    """
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.is_complex()):
            return x
        # Fast path: a NaN/inf element always makes the sum NaN/inf, so a finite sum proves every element finite
        # (~100x cheaper on CPU than materializing isfinite); a non-finite sum (or an overflow) takes the exact test.
        total = x.sum(dtype=torch.float32) if x.is_floating_point() and x.element_size() < 4 else x.sum()
        if bool(torch.isfinite(total).all()) or bool(torch.isfinite(x).all()):
            return x
        bad, nan, n = int((~torch.isfinite(x)).sum()), int(torch.isnan(x).sum()), x.numel()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fc" or bool(np.isfinite(arr).all()):
            return x
        bad, nan, n = int((~np.isfinite(arr)).sum()), int(np.isnan(arr).sum()), arr.size
    raise NonFiniteError(f"{bad} of {n} values are non-finite ({nan} NaN, {bad - nan} inf) in {what}; this needs "
                         "finite numbers: find where they come from (inputs, an fp16 overflow, a diverged model/SAE)")
