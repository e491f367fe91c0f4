"""Per-call dispatch of the SAE hot paths (encode, sparse decode) between Triton and the torch twins.

The backend is chosen on every call from the tensors' device, never at import time, and is never
printed: ``last_backend()`` tells which one the latest call in this thread used. Triton is imported
only inside the Triton path, so ``import toolkit.kernels`` works without it.

Choice rule (``select_backend``): an explicit ``backend="torch"|"triton"`` wins; ``None`` means the
environment variable ``TOOLKIT_KERNEL_BACKEND`` (``torch``, ``triton`` or ``auto``; default ``auto``);
``auto`` is Triton for CUDA tensors when triton is installed, torch otherwise. Triton on CPU tensors
is allowed only under the Triton interpreter (``TRITON_INTERPRET=1``, set before the kernel modules
are first imported).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from typing import Literal

import torch

from toolkit.kernels.reference import (
    check_decode_args,
    check_encode_args,
    decode_sparse_ref,
    encode_ref,
    encode_topk_ref,
    nonzero_layout,
    pad_layout,
    to_sparse,
)

Backend = Literal["torch", "triton"]

__all__ = [
    "Backend",
    "SPARSE_DECODE_MAX_DENSITY",
    "decode_dense",
    "decode_sparse",
    "encode",
    "encode_topk",
    "last_backend",
    "select_backend",
    "to_sparse",
]

ENV_VAR = "TOOLKIT_KERNEL_BACKEND"
_CHOICES = ("torch", "triton", "auto")
_state = threading.local()

# decode_dense takes the sparse path when (max nonzeros in a row) / d_sae is at most this. The sparse
# path moves kmax rows of W_dec per output row, the dense one does a d_sae-wide GEMM: on CPU a gathered
# row costs about as much as 8-10 GEMM rows (measured, 2 cores), on GPUs tensor-core GEMMs are far
# faster per row, so the bar is lower there.
SPARSE_DECODE_MAX_DENSITY = {"cpu": 1 / 16, "cuda": 1 / 64}


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # looked up on first use, never imported here


def triton_interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def select_backend(t: torch.Tensor, backend: str | None = None) -> Backend:
    """Backend for a call whose main tensor is ``t``: explicit choice, else $TOOLKIT_KERNEL_BACKEND, else auto."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR, "").strip().lower() or "auto", f"${ENV_VAR}"
    if backend not in _CHOICES:
        raise ValueError(f"{source} must be one of {_CHOICES} (or None), got {backend!r}")
    if backend == "auto":
        return "triton" if t.is_cuda and _triton_installed() else "torch"
    if backend == "torch":
        return "torch"
    if not _triton_installed():
        raise ValueError(f"{source}='triton' but triton is not installed; use backend='torch'")
    if t.is_cuda:
        return "triton"
    if t.device.type == "cpu" and triton_interpreting():
        return "triton"
    raise ValueError(
        f"{source}='triton' needs CUDA tensors, got a tensor on {t.device}; on CPU Triton runs only in its "
        "interpreter (set TRITON_INTERPRET=1 before the kernels are first used) - or use backend='torch'"
    )


def last_backend() -> str | None:
    """Backend used by the most recent kernel call in this thread (None before any call)."""
    return getattr(_state, "backend", None)


def _use(t: torch.Tensor, backend: str | None) -> Backend:
    chosen = select_backend(t, backend)
    _state.backend = chosen
    return chosen


def encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    *,
    activation: str,
    threshold: torch.Tensor | None = None,
    k: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Dense SAE codes ``(..., d_sae)`` for activation relu / jumprelu / topk; see ``reference.encode_ref``."""
    check_encode_args(x, W_enc, b_enc, activation, threshold, k)
    if _use(x, backend) == "torch":
        return encode_ref(x, W_enc, b_enc, activation=activation, threshold=threshold, k=k)
    from toolkit.kernels.triton_encode import encode_triton

    return encode_triton(x, W_enc, b_enc, activation=activation, threshold=threshold, k=k)


def encode_topk(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK codes as ``(values (..., k) after ReLU, indices (..., k) int64)``, values sorted descending."""
    check_encode_args(x, W_enc, b_enc, "topk", None, k)
    if _use(x, backend) == "torch":
        return encode_topk_ref(x, W_enc, b_enc, k)
    from toolkit.kernels.triton_encode import encode_topk_triton

    return encode_topk_triton(x, W_enc, b_enc, k)


def decode_sparse(
    indices: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[n] = sum_j values[n, j] * W_dec[indices[n, j]] (+ b_dec)``; differentiable in values, W_dec, b_dec."""
    check_decode_args(indices, values, W_dec, b_dec, check_range=False)  # each backend checks the range
    if _use(W_dec, backend) == "torch":
        return decode_sparse_ref(indices, values, W_dec, b_dec)
    from toolkit.kernels.triton_decode import decode_sparse_triton

    return decode_sparse_triton(indices, values, W_dec, b_dec)


def decode_dense(
    codes: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``codes @ W_dec (+ b_dec)`` for dense codes ``(..., d_sae)``, through the sparse path when sparse enough.

    Rule: sparse path iff ``max nonzeros per row <= SPARSE_DECODE_MAX_DENSITY[device] * d_sae``
    (devices other than CPU use the "cuda" bar); otherwise a dense matmul, reported as backend "torch".
    """
    if not isinstance(codes, torch.Tensor) or not codes.is_floating_point():
        raise TypeError(
            f"codes must be a floating tensor, got {getattr(codes, 'dtype', type(codes).__name__)}"
        )
    if W_dec.ndim != 2 or codes.ndim < 1 or codes.shape[-1] != W_dec.shape[0]:
        raise ValueError(
            f"codes has shape {tuple(codes.shape)} but W_dec has shape {tuple(W_dec.shape)}; "
            "codes' last dim must equal W_dec.shape[0] (d_sae)"
        )
    check_decode_args(
        torch.zeros(1, dtype=torch.int64, device=codes.device),
        codes.new_zeros(1),
        W_dec,
        b_dec,
        check_range=False,
    )
    chosen = select_backend(W_dec, backend)
    d_sae = W_dec.shape[0]
    bar = SPARSE_DECODE_MAX_DENSITY["cpu" if codes.device.type == "cpu" else "cuda"]
    c = codes.reshape(-1, d_sae)
    rows, cols, counts = nonzero_layout(c)
    if c.shape[0] == 0 or int(counts.max()) <= bar * d_sae:
        indices, values = pad_layout(c, rows, cols, counts)
        out = decode_sparse(indices, values, W_dec, b_dec, backend=chosen)
        return out.reshape(*codes.shape[:-1], W_dec.shape[1])
    _state.backend = "torch"
    out = codes @ W_dec
    return out + b_dec if b_dec is not None else out
