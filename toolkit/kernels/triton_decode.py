"""Triton sparse SAE decode: ``out[n] = sum_j values[n, j] * W_dec[indices[n, j]] (+ b_dec)``.

Forward: one program per (output row, block of d_in columns) gathers only the active decoder rows
(padding entries with value 0 are masked out of the loads) and accumulates in fp32.
Backward, also Triton: ``grad_values[n, j] = grad_out[n] . W_dec[indices[n, j]]`` (gather + dot per row)
and ``grad_W_dec[indices[n, j]] += values[n, j] * grad_out[n]`` by fp32 atomic adds, so only touched
rows of the (dense) W_dec gradient are nonzero; the atomic order makes that gradient non-deterministic
in its last bits on GPU. ``grad_b_dec = grad_out.sum(0)`` in torch.

Import this module only through ``toolkit.kernels`` (or after setting ``TRITON_INTERPRET=1`` on CPU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from toolkit.kernels.dispatch import triton_interpreting
from toolkit.kernels.reference import check_decode_args


class DecodeBlocks(NamedTuple):
    """Tile sizes of the decode kernels: active entries per step and d_in columns per program."""

    block_k: int
    block_d: int
    num_warps: int = 4


def default_blocks(t: torch.Tensor) -> DecodeBlocks:
    """Tiles for ``t``'s device; under the interpreter few, wide programs (its cost grows per program)."""
    if not t.is_cuda or triton_interpreting():
        return DecodeBlocks(64, 1024)
    return DecodeBlocks(16, 256)


@triton.jit
def _add(a, b):
    return a + b


# Row sums go through the builtin tl.reduce with the combine function that tl.sum itself uses: the
# interpreter maps exactly that one to numpy.sum (any other combine runs element by element in Python,
# thousands of times slower), and unlike calling the @jit tl.sum it works even when triton was imported
# before TRITON_INTERPRET=1 was set. Same code as tl.sum when compiled. See encode.py on builtins.
_SUM = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _decode_fwd_kernel(
    idx_ptr, val_ptr, w_ptr, b_ptr, out_ptr,
    K, D, stride_wr, stride_wd, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.full((BLOCK_D,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        val = tl.load(val_ptr + n * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        live = mask_k & (val != 0.0)  # padding reads no decoder row
        rows = tl.load(
            w_ptr + idx[:, None] * stride_wr + offs_d[None, :] * stride_wd,
            mask=live[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.reduce(rows * val[:, None], 0, _SUM)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * stride_om + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _decode_grad_values_kernel(
    idx_ptr, w_ptr, g_ptr, gv_ptr,
    K, D, stride_wr, stride_wd,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc = tl.full((BLOCK_K,), 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(g_ptr + n * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        rows = tl.load(
            w_ptr + idx[:, None] * stride_wr + offs_d[None, :] * stride_wd,
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.reduce(rows * g[None, :], 1, _SUM)
    tl.store(gv_ptr + n * K + offs_k, acc.to(gv_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _decode_grad_w_kernel(
    idx_ptr, val_ptr, g_ptr, gw_ptr,
    K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    g = tl.load(g_ptr + n * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        val = tl.load(val_ptr + n * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        live = mask_k & (val != 0.0)
        tl.atomic_add(
            gw_ptr + idx[:, None] * D + offs_d[None, :],
            val[:, None] * g[None, :],
            mask=live[:, None] & mask_d[None, :],
        )


def _forward(idx2, val2, W_dec, b_dec, bl: DecodeBlocks) -> torch.Tensor:
    N, K = idx2.shape
    D = W_dec.shape[1]
    out = torch.empty(N, D, dtype=W_dec.dtype, device=W_dec.device)
    if N == 0 or D == 0:
        return out
    grid = (N, triton.cdiv(D, bl.block_d))
    _decode_fwd_kernel[grid](
        idx2, val2, W_dec, b_dec if b_dec is not None else W_dec, out,
        K, D, W_dec.stride(0), W_dec.stride(1), out.stride(0),
        HAS_BIAS=b_dec is not None, BLOCK_K=bl.block_k, BLOCK_D=bl.block_d, num_warps=bl.num_warps,
    )  # fmt: skip
    return out


class _DecodeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx2, val2, W_dec, b_dec, bl):
        ctx.save_for_backward(idx2, val2, W_dec)
        ctx.bl = bl
        ctx.has_bias = b_dec is not None
        return _forward(idx2, val2, W_dec, b_dec, bl)

    @staticmethod
    def backward(ctx, grad_out):
        idx2, val2, W_dec = ctx.saved_tensors
        bl: DecodeBlocks = ctx.bl
        g = grad_out.contiguous()
        N, K = idx2.shape
        D = W_dec.shape[1]
        grad_val = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_val = torch.zeros_like(val2)
            if N and D:
                _decode_grad_values_kernel[(N, triton.cdiv(K, bl.block_k))](
                    idx2, W_dec, g, grad_val, K, D, W_dec.stride(0), W_dec.stride(1),
                    BLOCK_K=bl.block_k, BLOCK_D=bl.block_d, num_warps=bl.num_warps,
                )  # fmt: skip
        if ctx.needs_input_grad[2]:
            acc = torch.zeros(W_dec.shape, dtype=torch.float32, device=W_dec.device)
            if N and D:
                _decode_grad_w_kernel[(N, triton.cdiv(D, bl.block_d))](
                    idx2, val2, g, acc, K, D,
                    BLOCK_K=bl.block_k, BLOCK_D=bl.block_d, num_warps=bl.num_warps,
                )  # fmt: skip
            grad_w = acc.to(W_dec.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g.sum(0)
        return None, grad_val, grad_w, grad_b, None


def decode_sparse_triton(
    indices: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    blocks: DecodeBlocks | None = None,
) -> torch.Tensor:
    """Triton twin of ``decode_sparse_ref`` (same arguments, plus optional tile sizes)."""
    check_decode_args(indices, values, W_dec, b_dec)
    lead, k = indices.shape[:-1], indices.shape[-1]
    idx2 = indices.reshape(-1, k).contiguous()
    val2 = values.reshape(-1, k).contiguous()
    out = _DecodeFn.apply(idx2, val2, W_dec, b_dec, blocks or default_blocks(W_dec))
    return out.reshape(*lead, W_dec.shape[1])
