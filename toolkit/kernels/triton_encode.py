"""Triton fused SAE encode: tiled GEMM ``x @ W_enc`` with the bias and the activation in the epilogue.

What is fused: for relu and jumprelu, one kernel reads x and W_enc tile by tile, accumulates in fp32,
adds ``b_enc``, rounds to the output dtype, applies ``relu(pre) * (pre > threshold)`` and stores the
codes: the pre-activations never reach memory. For topk only GEMM + bias is fused; the selection is
``torch.topk`` on the kernel's output (then ReLU and a scatter into the dense output), exactly as in
the torch twin.

Backward (autograd) is torch: ``grad_pre = grad * (codes > 0)``, then two GEMMs and a sum. The
threshold gets no gradient (the spec's ``pre > threshold`` is a step function); JumpReLU training
uses its own straight-through estimator on top.

Non-finite inputs give what the twin gives: a NaN pre-activation stays NaN through every epilogue (relu,
jumprelu, and topk, whose selection is the twin's own ``torch.topk``), +inf stays +inf, -inf gives 0.
Difference from the twin, by design: on GPU, 16-bit tiles go to the tensor cores without upcasting
(exact products, fp32 accumulation).

Use it through ``toolkit.kernels`` (or import it after setting ``TRITON_INTERPRET=1`` on CPU: the
``@triton.jit`` decorators read that variable at import). Take names with ``from toolkit.kernels.triton_encode
import ...``: the attribute ``toolkit.kernels.triton_encode`` is the public function, not this module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from toolkit.kernels.dispatch import triton_interpreting
from toolkit.kernels.reference import check_encode_args, topk_from_pre

_ACT_CODE = {"none": 0, "relu": 1, "jumprelu": 2}


class EncodeBlocks(NamedTuple):
    """Tile sizes and launch settings of the encode GEMM (powers of two, >= 16)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def default_blocks(t: torch.Tensor, rows: int) -> EncodeBlocks:
    """Tiles for ``t``'s device and dtype; under the interpreter (cost per program and per padded
    multiply-add) big tiles over d_sae and d_in and just enough over the ``rows``."""
    if not t.is_cuda or triton_interpreting():
        return EncodeBlocks(min(64, max(16, triton.next_power_of_2(rows))), 128, 128)
    if t.dtype == torch.float32:
        return EncodeBlocks(128, 128, 32)
    return EncodeBlocks(128, 128, 64)  # 96 KiB of shared memory at 3 stages: fits most GPUs


# The kernels call only triton.language builtins, none of its @jit helpers (tl.cdiv, tl.zeros, tl.sum):
# those are compiled or interpreted once, when triton is first imported, so under TRITON_INTERPRET=1
# set after that import they would fail; builtins follow the interpreter whenever it is on.
@triton.jit
def _encode_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_on,
    ACTIVATION: tl.constexpr,  # 0 none (bias only), 1 relu, 2 jumprelu
    UPCAST: tl.constexpr,  # fp32 tiles before tl.dot (interpreter: bf16 dot is wrong there)
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped program order: GROUP_M row-tiles share each W column tile while it is in L2.
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    # Round to the output dtype before the epilogue so the comparison sees what the twin sees.
    pre = (acc + bias[None, :]).to(out_ty).to(tl.float32)
    # NaN stays NaN (pre != pre), as in the twin: relu(NaN) = NaN, and NaN * (NaN > thr) = NaN * 0 = NaN.
    if ACTIVATION == 1:
        pre = tl.where((pre > 0.0) | (pre != pre), pre, 0.0)
    elif ACTIVATION == 2:
        thr = tl.load(thr_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        pre = tl.where(((pre > thr[None, :]) & (pre > 0.0)) | (pre != pre), pre, 0.0)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, pre.to(out_ty), mask=mask_m[:, None] & mask_n[None, :])


def encode_gemm(
    x2: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor | None,
    activation: str,
    blocks: EncodeBlocks | None = None,
) -> torch.Tensor:
    """Run the fused kernel on 2-D ``x2``; ``activation`` is "none" (bias only), "relu" or "jumprelu"."""
    M, K = x2.shape
    N = W_enc.shape[1]
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    if M == 0 or N == 0:
        return out
    bl = blocks or default_blocks(x2, M)
    # fp32 dots in "ieee" (not TF32: that would break the 1e-5 agreement with the twin); 16-bit tiles
    # go to the tensor cores as they are (exact products, fp32 accumulation), except in the
    # interpreter, whose bf16 tl.dot is wrong, where every tile is upcast.
    upcast = triton_interpreting() or x2.dtype == torch.float32
    grid = (triton.cdiv(M, bl.block_m) * triton.cdiv(N, bl.block_n),)
    _encode_kernel[grid](
        x2, W_enc, b_enc, threshold if threshold is not None else b_enc, out,
        M, N, K,
        x2.stride(0), x2.stride(1), W_enc.stride(0), W_enc.stride(1), out.stride(0), out.stride(1),
        ACTIVATION=_ACT_CODE[activation], UPCAST=upcast, PRECISION="ieee" if upcast else "tf32",
        BLOCK_M=bl.block_m, BLOCK_N=bl.block_n, BLOCK_K=bl.block_k, GROUP_M=bl.group_m,
        num_warps=bl.num_warps, num_stages=bl.num_stages,
    )  # fmt: skip
    return out


def _dense_codes(x2, W_enc, b_enc, threshold, activation, k, blocks):
    if activation != "topk":
        return encode_gemm(x2, W_enc, b_enc, threshold, activation, blocks)
    pre = encode_gemm(x2, W_enc, b_enc, None, "none", blocks)
    values, indices = topk_from_pre(pre, k)
    return pre.zero_().scatter_(-1, indices, values)


def _grad_params(ctx, grad_pre: torch.Tensor):
    x2, W_enc = ctx.saved_tensors[:2]
    gx = grad_pre @ W_enc.t() if ctx.needs_input_grad[0] else None
    gw = x2.t() @ grad_pre if ctx.needs_input_grad[1] else None
    gb = grad_pre.sum(0) if ctx.needs_input_grad[2] else None
    return gx, gw, gb


class _EncodeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, W_enc, b_enc, threshold, activation, k, blocks):
        codes = _dense_codes(x2, W_enc, b_enc, threshold, activation, k, blocks)
        ctx.save_for_backward(x2, W_enc, codes)
        return codes

    @staticmethod
    def backward(ctx, grad):
        codes = ctx.saved_tensors[2]
        grad_pre = grad * (codes > 0)
        return (*_grad_params(ctx, grad_pre), None, None, None, None)


class _EncodeTopKFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, W_enc, b_enc, k, blocks):
        pre = encode_gemm(x2, W_enc, b_enc, None, "none", blocks)
        values, indices = topk_from_pre(pre, k)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(x2, W_enc, values, indices)
        ctx.d_sae = pre.shape[1]
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        values, indices = ctx.saved_tensors[2:]
        grad_pre = grad_values.new_zeros(values.shape[0], ctx.d_sae)
        grad_pre.scatter_(-1, indices, grad_values * (values > 0))
        return (*_grad_params(ctx, grad_pre), None, None)


def encode_triton(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    *,
    activation: str,
    threshold: torch.Tensor | None = None,
    k: int | None = None,
    blocks: EncodeBlocks | None = None,
) -> torch.Tensor:
    """Triton twin of ``encode_ref`` (same arguments, plus optional tile sizes)."""
    check_encode_args(x, W_enc, b_enc, activation, threshold, k)
    lead, d_sae = x.shape[:-1], W_enc.shape[1]
    codes = _EncodeFn.apply(x.reshape(-1, x.shape[-1]), W_enc, b_enc, threshold, activation, k, blocks)
    return codes.reshape(*lead, d_sae)


def encode_topk_triton(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *, blocks: EncodeBlocks | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``encode_topk_ref``: ``(values (..., k) after ReLU, indices (..., k) int64)``."""
    check_encode_args(x, W_enc, b_enc, "topk", None, k)
    lead = x.shape[:-1]
    values, indices = _EncodeTopKFn.apply(x.reshape(-1, x.shape[-1]), W_enc, b_enc, k, blocks)
    return values.reshape(*lead, k), indices.reshape(*lead, k)
