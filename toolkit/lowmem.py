"""Keep a bf16 checkpoint's tied embedding/unembedding in bf16 while everything computes in fp32 (CPU).

The 262k x d_model matrix is 63 % of Gemma 3 270M's weights. Held in bf16 (the checkpoint's own precision,
so nothing is rounded) it costs half; lookups are cast to fp32 and the unembedding multiplies fp32 hidden
states by fp32 copies of row chunks, so results equal an all-fp32 model up to summation order.
Models loaded in one process share an identical embedding matrix; it is frozen (requires_grad=False).
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

CHUNK_ROWS = 4096
"""Vocabulary rows cast to fp32 at a time in the unembedding, into one reused buffer per thread (4096 x 640 x 4 B
= 10.5 MB). A fresh chunk per step (the earlier 16384 rows, 42 MB) was a new mapping whose page faults cost
more than the cast itself; far smaller chunks make two threads meet at a barrier hundreds of times per call,
which stalls on a busy machine. Measured for one decode step (1 row) with the commands in the commit."""

_BUFFERS = threading.local()

_LIVE_EMBEDDINGS: weakref.WeakSet = weakref.WeakSet()
_LIVE_TOKENIZERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
_LOAD_ONLY_KEYS = ("local_files_only",)
"""tokenizer_config.json keys that only record how a tokenizer was loaded (a fine-tune saved from a model loaded
offline writes local_files_only=true where its base has false); they do not change the tokenizer."""


def _tokenizer_file_key(f: Path) -> bytes:
    """The bytes a tokenizer file is compared by: the file, or tokenizer_config.json without load-only keys."""
    data = f.read_bytes()
    if f.name != "tokenizer_config.json":
        return data
    try:
        cfg = json.loads(data)
    except ValueError:
        return data
    if not isinstance(cfg, dict):
        return data
    return json.dumps({k: v for k, v in cfg.items() if k not in _LOAD_ONLY_KEYS}, sort_keys=True).encode()


def shared_tokenizer(folder: str | Path, load: Callable[[], Any]) -> Any:
    """The tokenizer of a local model folder, shared with any live model whose tokenizer files are identical.

    A 262k-entry Gemma tokenizer holds ~0.3 GB; a fine-tune saved beside its base has identical files (its
    tokenizer_config.json may differ in load-only keys such as local_files_only, which are ignored).
    Shared means one object: change its settings (e.g. `padding_side`) and every model sharing it sees that.
    """
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = Path(folder) / name
        digest.update(name.encode() + (_tokenizer_file_key(f) if f.is_file() else b"-"))
    key = digest.hexdigest()
    tok = _LIVE_TOKENIZERS.get(key)
    if tok is None:
        tok = load()
        _LIVE_TOKENIZERS[key] = tok
    return tok


def _chunks(weight: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, weight[start:end] cast to `dtype`) over row chunks, cast into this thread's reused buffer."""
    rows = CHUNK_ROWS
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None or (buf.device, buf.dtype, buf.shape) != (weight.device, dtype, (rows, weight.shape[1])):
        buf = _BUFFERS.buf = torch.empty(rows, weight.shape[1], dtype=dtype, device=weight.device)
    for s in range(0, weight.shape[0], rows):
        e = min(s + rows, weight.shape[0])
        w = buf[:e - s]
        w.copy_(weight[s:e])
        yield s, e, w


class _ChunkedUnembed(torch.autograd.Function):
    """x (..., d) fp32 @ weight (V, d) bf16 .T in fp32, one row chunk of `weight` at a time (forward and backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], weight.shape[0])
        for s, e, w in _chunks(weight, flat.dtype):
            torch.mm(flat, w.t(), out=out[:, s:e])
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        gx = g.new_zeros(g.shape[0], weight.shape[1])
        for s, e, w in _chunks(weight, g.dtype):
            gx.addmm_(g[:, s:e], w)
        return gx.view(*grad.shape[:-1], weight.shape[1]), None


def _embedding_forward(self: torch.nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.embedding(input_ids, self.weight, self.padding_idx).to(self.compute_dtype)
    scale = getattr(self, "scalar_embed_scale", None)  # Gemma 3 scales inside the embedding (Gemma 2 in the model)
    return out * torch.tensor(scale, dtype=out.dtype) if scale is not None else out


def _unembed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = _ChunkedUnembed.apply(x, self.weight)
    return out + self.bias if self.bias is not None else out


@functools.cache
def _subclass(cls: type, kind: str) -> type:
    """`cls` with the low-memory forward (or, for the model, a `dtype` that reports the compute dtype)."""
    if kind == "embed":
        attrs = {"forward": _embedding_forward}
    elif kind == "unembed":
        attrs = {"forward": _unembed_forward}
    else:
        attrs = {"dtype": property(lambda self: self._compute_dtype)}
    return type(cls.__name__, (cls,), {**attrs, "__module__": cls.__module__, "_toolkit_lowmem": True})


def is_bf16_checkpoint(path_or_id: str, config: Any) -> bool:
    """True when every floating weight of the checkpoint is bf16 (so a bf16 load rounds nothing).

    A local folder is judged by its safetensors headers (a config's dtype can be stale); a hub id by its config.
    """
    files = sorted(Path(path_or_id).expanduser().glob("*.safetensors")) if Path(path_or_id).expanduser().is_dir() else []
    if not files:
        dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return dt in (torch.bfloat16, "bfloat16")
    dtypes = set()
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes & {"BF16", "F16", "F32", "F64"} == {"BF16"}


def keep_embedding_bf16(hf: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Cast every weight of a bf16-loaded tied model to `dtype` except the embedding matrix; compute in `dtype`.

    Parameters are cast one at a time, so the peak stays near the final size. Returns `hf`, changed in place.
    """
    emb, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        raise ValueError("keep_embedding_bf16 needs tied input/output embeddings (Gemma's are tied)")
    for module in hf.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p is not emb.weight and p.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    emb.weight.requires_grad_(False)
    emb.compute_dtype = dtype
    emb.__class__ = _subclass(type(emb), "embed")
    head.__class__ = _subclass(type(head), "unembed")
    hf._compute_dtype = dtype
    hf.__class__ = _subclass(type(hf), "model")
    _share_embedding(emb, head)
    return hf


def _share_embedding(emb: torch.nn.Embedding, head: torch.nn.Linear) -> None:
    """Point `emb` and its tied head at an identical bf16 matrix that another live model already holds."""
    for other in list(_LIVE_EMBEDDINGS):
        w = other.weight
        if w is not emb.weight and w.shape == emb.weight.shape and w.device == emb.weight.device \
                and torch.equal(w, emb.weight):
            emb.weight = head.weight = w
            break
    _LIVE_EMBEDDINGS.add(emb)


def is_lowmem(hf: torch.nn.Module) -> bool:
    """True when `hf` was set up by `keep_embedding_bf16`."""
    return bool(getattr(type(hf), "_toolkit_lowmem", False))
