"""Triton sparse decode (forward and backward) against its torch twin (reliability cases 12 and 13)."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import assert_close, make_sae, make_x
from toolkit.kernels import decode_dense, decode_sparse, last_backend, to_sparse
from toolkit.kernels.reference import decode_sparse_ref

pytestmark = pytest.mark.usefixtures("triton_env")


def sparse_codes(*lead: int, d_sae: int, k: int, seed: int = 2, device="cpu", dtype=torch.float32):
    """Padded (indices, values): row n has between 1 and k distinct active latents, values > 0."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(lead).prod()) if lead else 1
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k)
    counts = torch.randint(1, k + 1, (n,), generator=g)
    live = torch.arange(k)[None, :] < counts[:, None]
    val = torch.rand(n, k, generator=g) * live + 0.1 * live
    idx = torch.where(live, idx.long(), 0)
    return idx.reshape(*lead, k).to(device), val.reshape(*lead, k).to(device=device, dtype=dtype)


def _grads(backend, idx, val, W_dec, b_dec, g):
    leaves = [val.clone().requires_grad_(True), W_dec.clone().requires_grad_(True)]
    if b_dec is not None:
        leaves.append(b_dec.clone().requires_grad_(True))
    out = decode_sparse(idx, *leaves, backend=backend)
    return out, torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("d_in, d_sae", [(640, 300), (2304, 500)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_decode_forward_backward_match_torch(triton_env, d_in, d_sae, with_bias):
    _, _, W_dec, b_dec = make_sae(d_in, d_sae, device=triton_env)
    b_dec = b_dec if with_bias else None
    idx, val = sparse_codes(7, d_sae=d_sae, k=40, device=triton_env)
    g = make_x(7, d_in, seed=4, device=triton_env)
    out_t, grads_t = _grads("triton", idx, val, W_dec, b_dec, g)
    assert last_backend() == "triton"
    out_r, grads_r = _grads("torch", idx, val, W_dec, b_dec, g)
    assert last_backend() == "torch"
    assert_close(out_t, out_r, 1e-5, "forward")  # reliability case 12
    for a, b, name in zip(grads_t, grads_r, ("values", "W_dec", "b_dec"), strict=False):
        assert_close(a, b, 1e-5, name)
    touched = torch.zeros(d_sae, dtype=torch.bool, device=triton_env)
    touched[idx[val != 0]] = True
    assert not grads_t[1][~touched].any(), "W_dec grad is zero on untouched rows"


@pytest.mark.parametrize("k", [1, 300])
def test_k_edges(triton_env, k):
    _, _, W_dec, b_dec = make_sae(640, 300, device=triton_env)
    idx, val = sparse_codes(5, d_sae=300, k=k, device=triton_env)
    g = make_x(5, 640, seed=4, device=triton_env)
    out_t, grads_t = _grads("triton", idx, val, W_dec, b_dec, g)
    out_r, grads_r = _grads("torch", idx, val, W_dec, b_dec, g)
    assert_close(out_t, out_r, 1e-5, "forward")
    for a, b in zip(grads_t, grads_r, strict=True):
        assert_close(a, b, 1e-5)


def test_zero_rows_leading_dims_int32(triton_env):
    _, _, W_dec, b_dec = make_sae(640, 300, device=triton_env)
    for lead in [(0,), (2, 3), ()]:
        idx, val = sparse_codes(*lead, d_sae=300, k=8, device=triton_env)
        out = decode_sparse(idx, val, W_dec, b_dec, backend="triton")
        assert out.shape == (*lead, 640)
        assert_close(out, decode_sparse_ref(idx, val, W_dec, b_dec), 1e-5, str(lead))
    idx, val = sparse_codes(4, d_sae=300, k=8, device=triton_env)
    got = decode_sparse(idx.int(), val, W_dec, backend="triton")
    assert_close(got, decode_sparse_ref(idx, val, W_dec), 1e-5, "int32 indices")


def test_non_contiguous_inputs(triton_env):
    W_enc, _, _, _ = make_sae(640, 300, device=triton_env)
    W_dec = W_enc.t()  # tied decoder: a transposed view
    idx, val = sparse_codes(6, d_sae=300, k=16, device=triton_env)
    idx_nc, val_nc = idx.t().contiguous().t(), val.t().contiguous().t()
    assert not W_dec.is_contiguous() and not val_nc.is_contiguous()
    g = make_x(6, 640, seed=4, device=triton_env)
    out_t, grads_t = _grads("triton", idx_nc, val_nc, W_dec, None, g)
    out_r, grads_r = _grads("torch", idx, val, W_dec.contiguous(), None, g)
    assert_close(out_t, out_r, 1e-5)
    for a, b in zip(grads_t, grads_r, strict=True):
        assert_close(a, b, 1e-5)


def test_tiles_smaller_than_the_problem(triton_env):
    from toolkit.kernels.triton_decode import DecodeBlocks, decode_sparse_triton

    _, _, W_dec, b_dec = make_sae(640, 300, device=triton_env)
    idx, val = sparse_codes(3, d_sae=300, k=37, device=triton_env)
    got = decode_sparse_triton(idx, val, W_dec, b_dec, blocks=DecodeBlocks(16, 256))
    assert_close(got, decode_sparse_ref(idx, val, W_dec, b_dec), 1e-5)


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision(triton_env, dtype, rtol):
    _, _, W_dec, b_dec = make_sae(640, 300, device=triton_env, dtype=dtype)
    idx, val = sparse_codes(5, d_sae=300, k=20, device=triton_env, dtype=dtype)
    got = decode_sparse(idx, val, W_dec, b_dec, backend="triton")
    assert got.dtype == dtype
    want = decode_sparse_ref(idx, val.float(), W_dec.float(), b_dec.float())
    assert_close(got.float(), want, rtol, str(dtype))


def test_decode_dense_uses_the_chosen_backend(triton_env):
    _, _, W_dec, b_dec = make_sae(640, 320, device=triton_env)
    idx, val = sparse_codes(4, d_sae=320, k=5, device=triton_env)
    codes = torch.zeros(4, 320, device=triton_env).scatter_add(1, idx, val)
    got = decode_dense(codes, W_dec, b_dec, backend="triton")  # 5 nonzeros <= 320/16: sparse path
    assert last_backend() == "triton"
    assert_close(got, codes @ W_dec + b_dec, 1e-5)
    i2, v2 = to_sparse(codes)
    assert_close(decode_sparse(i2, v2, W_dec, b_dec, backend="triton"), got, 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_decode_gpu_realistic_shape():
    _, _, W_dec, b_dec = make_sae(2304, 16384, device="cuda")
    idx, val = sparse_codes(512, d_sae=16384, k=128, device="cuda")
    g = make_x(512, 2304, seed=4, device="cuda")
    out_t, grads_t = _grads(None, idx, val, W_dec, b_dec, g)
    assert last_backend() == "triton"
    out_r, grads_r = _grads("torch", idx, val, W_dec, b_dec, g)
    assert_close(out_t, out_r, 1e-5)
    for a, b in zip(grads_t, grads_r, strict=True):
        assert_close(a, b, 1e-5)


def test_out_of_range_indices_are_refused(triton_env):
    _, _, W_dec, _ = make_sae(64, 30, device=triton_env)
    idx = torch.tensor([[0, 30]], device=triton_env)
    with pytest.raises(ValueError, match=r"d_sae=30.*\[0, 30\]"):
        decode_sparse(idx, torch.ones(1, 2, device=triton_env), W_dec, backend="triton")
