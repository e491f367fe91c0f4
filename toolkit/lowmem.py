"""Keep a bf16 checkpoint's matrices in bf16 while everything computes in fp32 (CPU).

Held in bf16 (the checkpoint's own precision, so nothing is rounded) Gemma 3 270M's weights cost half. The
262k x d_model embedding (63 % of them) is looked up and cast; the unembedding multiplies fp32 hidden states by
fp32 copies of row chunks; every other linear layer casts its weight into a reused per-thread buffer just
before its matmul. An fp32 copy of a bf16 value is exact, so results equal an all-fp32 model (the matmuls see
the same fp32 operands). These weights are frozen (requires_grad=False); `thaw` makes a module trainable again.
Models loaded in one process share bitwise-identical weights: edit a weight in place only after `thaw`.
"""

from __future__ import annotations

import ctypes
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
_LIVE_LINEAR_WEIGHTS: dict[tuple, weakref.WeakValueDictionary] = {}  # (module name, shape) -> {id: weight}
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
    if buf is None or (buf.device, buf.dtype, buf.shape, buf.is_inference()) != \
            (weight.device, dtype, (rows, weight.shape[1]), torch.is_inference_mode_enabled()):
        buf = _BUFFERS.buf = torch.empty(rows, weight.shape[1], dtype=dtype, device=weight.device)
    for s in range(0, weight.shape[0], rows):
        e = min(s + rows, weight.shape[0])
        w = buf[:e - s]
        w.copy_(weight[s:e])
        yield s, e, w


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` cast to `dtype` in this thread's reused buffer of its shape (valid until the next cast of that shape)."""
    bufs = getattr(_BUFFERS, "linear", None)
    if bufs is None:
        bufs = _BUFFERS.linear = {}
    key = (weight.shape, dtype, weight.device, torch.is_inference_mode_enabled())  # inference tensors stay inside
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return buf.copy_(weight)


class _CastLinear(torch.autograd.Function):
    """F.linear(x, weight.to(x.dtype)) for a frozen low-precision weight; the backward re-casts (gradient to x)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, _cast(weight, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ _cast(weight, grad.dtype), None


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


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.dtype == x.dtype:  # thawed (a wrapper may still call this forward): an ordinary layer
        return torch.nn.functional.linear(x, self.weight, self.bias)
    if torch.is_grad_enabled() and x.requires_grad:
        out = _CastLinear.apply(x, self.weight)
    else:
        out = torch.nn.functional.linear(x, _cast(self.weight, x.dtype))
    return out + self.bias if self.bias is not None else out


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
    elif kind == "linear":
        attrs = {"forward": _linear_forward}
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


def keep_weights_bf16(hf: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Keep a bf16-loaded tied model's embedding and linear weights in bf16 (frozen), the rest in `dtype`;
    compute in `dtype`. Weights bitwise equal to those of a live low-memory model are shared with it.

    Parameters are cast one at a time, so the peak stays near the final size. Returns `hf`, changed in place.
    """
    emb, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        raise ValueError("keep_weights_bf16 needs tied input/output embeddings (Gemma's are tied)")
    linears = {m for m in hf.modules() if type(m) is torch.nn.Linear and m is not head}
    for module in hf.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p is emb.weight or not p.is_floating_point():
                continue
            if module in linears and name == "weight":
                p.requires_grad_(False)
            else:
                module._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    for m in linears:
        m.__class__ = _subclass(type(m), "linear")
    emb.weight.requires_grad_(False)
    emb.compute_dtype = dtype
    emb.__class__ = _subclass(type(emb), "embed")
    head.__class__ = _subclass(type(head), "unembed")
    hf._compute_dtype = dtype
    hf.__class__ = _subclass(type(hf), "model")
    _share_weights(hf, emb, head)
    return hf


def thaw(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Make the low-memory linear layers inside `module` ordinary trainable `dtype` layers (fresh parameters:
    a weight shared with another model is left untouched). Returns `module`."""
    for m in module.modules():
        if _is_cast_linear(m):
            m.weight = torch.nn.Parameter(m.weight.detach().to(dtype))
            m.__class__ = type(m).__mro__[1]
    return module


def _is_cast_linear(m: torch.nn.Module) -> bool:
    return type(m).__dict__.get("forward") is _linear_forward


def _share_weights(hf: torch.nn.Module, emb: torch.nn.Embedding, head: torch.nn.Linear) -> None:
    """Point `emb` (and its tied head) and each bf16 linear weight at a bitwise-equal tensor that another live
    low-memory model already holds (a fine-tune shares all but its trained layers with its base).

    Where anything was shared, the weights left are copied out of the checkpoint's memory map, so the mapping
    (whose pages the comparisons touched, counted in the process's resident memory) is released."""
    emb_shared, shared, own = False, False, []
    for other in list(_LIVE_EMBEDDINGS):
        w = other.weight
        if w is not emb.weight and w.shape == emb.weight.shape and w.device == emb.weight.device \
                and torch.equal(w, emb.weight):
            emb.weight = head.weight = w
            emb_shared = shared = True
            break
    _LIVE_EMBEDDINGS.add(emb)
    for name, m in hf.named_modules():
        if not _is_cast_linear(m):
            continue
        live = _LIVE_LINEAR_WEIGHTS.setdefault((name, tuple(m.weight.shape)), weakref.WeakValueDictionary())
        for w in list(live.values()):
            if w is not m.weight and w.dtype == m.weight.dtype and w.device == m.weight.device \
                    and torch.equal(w, m.weight):
                m.weight, shared = w, True
                break
        else:
            own.append((live, m))
        live[id(m.weight)] = m.weight
    if not shared:
        return  # keep the memory map: its pages are the file's, which the system can reclaim
    for live, m in own:
        live.pop(id(m.weight), None)
        m.weight = torch.nn.Parameter(m.weight.detach().clone(), requires_grad=False)
        live[id(m.weight)] = m.weight
    if not emb_shared:
        emb.weight = head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)


MMAP_THRESHOLD = 4 << 20
"""Low-memory mode asks glibc to serve allocations of at least 4 MB (a 16-position slice of 262k-vocab logits is
17 MB) from fresh mappings, unmapped when freed. glibc's default threshold grows to 32 MB after the first large
free, after which freed logits stayed in its heap: measured on tutorial 01's evaluate_sae step, RSS stayed
0.7 GB above what the process used (malloc_trim recovered it) and the next step's peak started from there."""


@functools.cache
def return_freed_memory() -> bool:
    """Make glibc return large freed blocks to the OS at once (process-wide, once); False where it cannot
    (not glibc). Called by low-memory loads."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) == 1
        return ok and libc.mallopt(m_trim_threshold, 2 * MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False


def trim() -> bool:
    """Hand the free memory inside glibc's heap back to the system (after a long job such as a fine-tune, whose
    many small freed blocks glibc keeps); True when some was handed back (False too where this is not glibc)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def is_lowmem(hf: torch.nn.Module) -> bool:
    """True when `hf` was set up by `keep_weights_bf16`."""
    return bool(getattr(type(hf), "_toolkit_lowmem", False))
