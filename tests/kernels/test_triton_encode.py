"""Triton fused encode against its torch twin (reliability cases 12 and 13).

Without CUDA the kernels run in the Triton interpreter (see conftest): shapes stay small in N, while
the widths are the real ones that are not powers of two (2304 = Gemma-2-2B, 640 = the default model).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.helpers import assert_close, gap_thresholds, make_sae, make_x
from toolkit.kernels import encode, encode_topk, last_backend
from toolkit.kernels.reference import encode_ref, encode_topk_ref

pytestmark = pytest.mark.usefixtures("triton_env")

WIDTHS = [(640, 300), (2304, 200)]  # (d_in, d_sae), neither a power of two


def _kwargs(activation, x, W_enc, b_enc, k=7):
    if activation == "jumprelu":
        return {"threshold": gap_thresholds(x, W_enc, b_enc)}
    return {"k": k} if activation == "topk" else {}


@pytest.mark.parametrize("d_in, d_sae", WIDTHS)
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_encode_matches_torch_fp32(triton_env, d_in, d_sae, activation):
    W_enc, b_enc, _, _ = make_sae(d_in, d_sae, device=triton_env)
    x = make_x(9, d_in, device=triton_env)
    kw = _kwargs(activation, x, W_enc, b_enc)
    got = encode(x, W_enc, b_enc, activation=activation, backend="triton", **kw)
    assert last_backend() == "triton"
    want = encode(x, W_enc, b_enc, activation=activation, backend="torch", **kw)
    assert last_backend() == "torch"
    assert_close(got, want, 1e-5, activation)  # reliability case 12
    assert torch.equal(got != 0, want != 0), "same active set"


@pytest.mark.parametrize("k", [1, 200])
def test_topk_k_edges(triton_env, k):
    W_enc, b_enc, _, _ = make_sae(640, 200, device=triton_env)
    x = make_x(5, 640, device=triton_env)
    values, idx = encode_topk(x, W_enc, b_enc, k, backend="triton")
    v_ref, i_ref = encode_topk_ref(x, W_enc, b_enc, k)
    assert values.shape == idx.shape == (5, k) and idx.dtype == torch.int64
    assert_close(values, v_ref, 1e-5, "values")
    assert torch.equal(idx.sort(-1).values, i_ref.sort(-1).values)
    dense = encode(x, W_enc, b_enc, activation="topk", k=k, backend="triton")
    assert_close(dense, encode_ref(x, W_enc, b_enc, activation="topk", k=k), 1e-5, "dense")


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_zero_rows_and_leading_dims(triton_env, activation):
    W_enc, b_enc, _, _ = make_sae(640, 300, device=triton_env)
    for lead in [(0,), (2, 0), (2, 3), ()]:
        x = make_x(*lead, 640, device=triton_env)
        kw = _kwargs(activation, make_x(8, 640, device=triton_env), W_enc, b_enc)
        got = encode(x, W_enc, b_enc, activation=activation, backend="triton", **kw)
        assert got.shape == (*lead, 300)
        assert_close(got, encode_ref(x, W_enc, b_enc, activation=activation, **kw), 1e-5, str(lead))
    values, idx = encode_topk(make_x(0, 640, device=triton_env), W_enc, b_enc, 4, backend="triton")
    assert values.shape == idx.shape == (0, 4)


def test_non_contiguous_inputs(triton_env):
    W_enc, b_enc, _, _ = make_sae(640, 300, device=triton_env)
    x = make_x(640, 12, device=triton_env).t()[::2]  # transposed and strided rows: (6, 640)
    W_cm = W_enc.t().contiguous().t()  # column-major W
    W_strided = torch.empty(640, 600, device=triton_env)[:, ::2]
    W_strided.copy_(W_enc)
    thr = gap_thresholds(x, W_enc, b_enc)
    want = encode_ref(x.contiguous(), W_enc, b_enc, activation="jumprelu", threshold=thr)
    for W in (W_cm, W_strided):
        assert not x.is_contiguous() and not W.is_contiguous()
        got = encode(x, W, b_enc, activation="jumprelu", threshold=thr, backend="triton")
        assert_close(got, want, 1e-5, f"W strides {W.stride()}")


def test_tiles_smaller_than_the_problem(triton_env):
    """Masks on every edge: d_in 640 is not a multiple of block_k 256, d_sae 300 not of block_n 64."""
    from toolkit.kernels.triton_encode import EncodeBlocks, encode_triton

    W_enc, b_enc, _, _ = make_sae(640, 300, device=triton_env)
    x = make_x(20, 640, device=triton_env)
    thr = gap_thresholds(x, W_enc, b_enc)
    got = encode_triton(
        x, W_enc, b_enc, activation="jumprelu", threshold=thr, blocks=EncodeBlocks(16, 64, 256, 2)
    )
    assert_close(got, encode_ref(x, W_enc, b_enc, activation="jumprelu", threshold=thr), 1e-5)


def _non_finite_x(device):
    """Rows: finite, one NaN element, all NaN, one +inf element, one -inf element, +inf and -inf together."""
    x = make_x(6, 640, device=device)
    x[1, 5] = float("nan")
    x[2] = float("nan")
    x[3, 7] = float("inf")
    x[4, 9] = -float("inf")
    x[5, 1], x[5, 2] = float("inf"), -float("inf")
    return x


def assert_same_non_finite(got, want, what):
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN in different places"
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()], want[want.isinf()]), what
    fin = got.isfinite()
    assert_close(got[fin], want[fin], 1e-5, what)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy matmul
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_non_finite_inputs_give_what_the_twin_gives(triton_env, activation):
    """Reliability case 12 on NaN/inf rows: the epilogue keeps NaN (the twin's relu(NaN) = NaN) instead of 0."""
    W_enc, b_enc, _, _ = make_sae(640, 300, device=triton_env)
    x = _non_finite_x(triton_env)
    kw = _kwargs(activation, make_x(8, 640, device=triton_env), W_enc, b_enc)
    got = encode(x, W_enc, b_enc, activation=activation, backend="triton", **kw)
    want = encode(x, W_enc, b_enc, activation=activation, backend="torch", **kw)
    assert got[1:].isnan().any() and not got[0].isnan().any()
    assert_same_non_finite(got, want, activation)
    if activation == "topk":
        v, i = encode_topk(x, W_enc, b_enc, 7, backend="triton")
        v_ref, i_ref = encode_topk_ref(x, W_enc, b_enc, 7)
        assert_same_non_finite(v, v_ref, "topk values")
        assert torch.equal(i, i_ref)


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_half_precision(triton_env, dtype, rtol, activation):
    """16-bit inputs: the kernel upcasts tiles (the interpreter's bf16 tl.dot is wrong) and accumulates in
    fp32; compared with the fp32 twin run on the same 16-bit values. The interpreter rounds fp32 -> bf16
    by truncation (GPUs round to nearest), hence 2 bf16 ulps."""
    W_enc, b_enc, _, _ = make_sae(640, 300, device=triton_env, dtype=dtype)
    x = make_x(9, 640, device=triton_env, dtype=dtype)
    kw = _kwargs(activation, x.float(), W_enc.float(), b_enc.float())
    got = encode(
        x, W_enc, b_enc, activation=activation, backend="triton", **{k: v.to(dtype) for k, v in kw.items()}
    )
    assert got.dtype == dtype
    want = encode_ref(x.float(), W_enc.float(), b_enc.float(), activation=activation, **kw)
    assert_close(got.float(), want, rtol, str(dtype))


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_encode_backward_matches_torch(triton_env, activation):
    W_enc, b_enc, _, _ = make_sae(640, 300, device=triton_env)
    x = make_x(2, 3, 640, device=triton_env)
    kw = _kwargs(activation, x, W_enc, b_enc, k=9)
    g = make_x(2, 3, 300, seed=7, device=triton_env)
    grads = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc)]
        out = encode(*leaves, activation=activation, backend=backend, **kw)
        grads[backend] = torch.autograd.grad(out, leaves, g)
    for a, b, name in zip(grads["triton"], grads["torch"], ("x", "W_enc", "b_enc"), strict=True):
        assert_close(a, b, 1e-5, name)


def test_encode_topk_backward_matches_torch(triton_env):
    W_enc, b_enc, _, _ = make_sae(640, 300, device=triton_env)
    x = make_x(4, 640, device=triton_env)
    g = make_x(4, 6, seed=3, device=triton_env)
    grads = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc)]
        values, _ = encode_topk(*leaves, 6, backend=backend)
        grads[backend] = torch.autograd.grad(values, leaves, g)
    for a, b, name in zip(grads["triton"], grads["torch"], ("x", "W_enc", "b_enc"), strict=True):
        assert_close(a, b, 1e-5, name)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_encode_gpu_realistic_shape(dtype, rtol):
    W_enc, b_enc, _, _ = make_sae(2304, 16384, device="cuda", dtype=dtype)
    x = make_x(1000, 2304, device="cuda", dtype=dtype)
    thr = gap_thresholds(x[:64].float(), W_enc.float(), b_enc.float()).to(dtype)
    got = encode(x, W_enc, b_enc, activation="jumprelu", threshold=thr)
    assert last_backend() == "triton"
    want = encode_ref(x.float(), W_enc.float(), b_enc.float(), activation="jumprelu", threshold=thr.float())
    mismatch = ((got != 0) != (want != 0)).float().mean().item()
    assert mismatch < 1e-4, f"{mismatch:.2e} of the gates differ"
    both = (got != 0) & (want != 0)
    assert_close(got.float() * both, want * both, rtol)
