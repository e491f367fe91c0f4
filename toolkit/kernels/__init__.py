"""SAE hot paths (encode, sparse decode): `dispatch` picks Triton or the torch twins (`reference`) per call;
`triton_encode` / `triton_decode` hold the Triton kernels, imported only on the Triton path."""

from toolkit.kernels.dispatch import (
    SPARSE_DECODE_MAX_DENSITY,
    Backend,
    decode_dense,
    decode_sparse,
    encode,
    encode_topk,
    last_backend,
    select_backend,
)
from toolkit.kernels.reference import to_sparse

__all__ = [
    "Backend", "SPARSE_DECODE_MAX_DENSITY", "decode_dense", "decode_sparse", "encode", "encode_topk",
    "last_backend", "select_backend", "to_sparse",
]
