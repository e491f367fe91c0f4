"""Device and dtype arguments checked before any work: a clear ArgumentError instead of torch's own error
(or an AttributeError from `getattr(torch, name)`) halfway through a load."""

from __future__ import annotations

import torch

from toolkit.errors import ArgumentError, DeviceUnavailableError
from toolkit.io import DTYPES


def resolve_device(device: str | torch.device | None, default: str = "cpu") -> torch.device:
    """`device` as a torch.device that exists on this machine; ArgumentError naming it and the valid ones."""
    if device is None:
        device = default
    if not isinstance(device, (str, torch.device)):
        raise ArgumentError(f"device must be a string like 'cpu' or 'cuda:0' or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceUnavailableError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:<index>'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceUnavailableError(f"device {device!r} asked for, but this machine has no CUDA GPU; use 'cpu'")
        if dev.index is not None and dev.index >= n:
            raise DeviceUnavailableError(f"device {device!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(f"device {device!r} asked for, but this machine has no MPS device; use 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`dtype` (a torch.dtype or one of DTYPES' names, 'torch.' prefix allowed) as a floating torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ArgumentError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} (or the torch.dtype)")
