"""Load Gemma models (embedded default, hub id, local folder, tiny test model) into one traced wrapper."""

from __future__ import annotations

import json
import os
import socket
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from toolkit.convert import prepare_default_model
from toolkit.devices import resolve_device, resolve_dtype
from toolkit.errors import ArgumentError, ContextLengthError, EmptyInputError, ModelUnavailableError
from toolkit.keys import manifest_weights_id
from toolkit.lowmem import is_bf16_checkpoint, keep_weights_bf16, return_freed_memory, shared_tokenizer
from toolkit.sites import SITE_KINDS, Site, site_width, validate_site

SUPPORTED_FAMILIES = ("gemma2", "gemma3")
_PROBE_TIMEOUT_S = 2.0  # one TCP connection to the hub before trying it; a dead network fails at once


@dataclass
class Model:
    """A Gemma model wrapped by nnsight, with the facts tracing needs (layers, widths, tokenizer, sites)."""

    nn: Any
    """The nnsight `TransformersModel`; `toolkit.tracing` is the only code that traces it."""
    hf: torch.nn.Module
    """The underlying Hugging Face causal LM (the same module nnsight wraps)."""
    tokenizer: Any
    name: str
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    d_mlp: int
    vocab_size: int
    max_context: int
    extra: dict[str, Any] = field(default_factory=dict)
    remote: str | None = None
    """The NDIF host that runs this model's traces (`load_model(..., remote=True)`), or None: traced here."""
    lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)
    """Held by every toolkit trace or generation on this model (toolkit.tracing.guard): concurrent calls from
    several threads run one after another."""

    @property
    def device(self) -> torch.device:
        """Where inputs go: the weights' device, or the CPU for a remote model (its weights stay on the service)."""
        return torch.device("cpu") if self.remote else next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (a low-memory model keeps its embedding matrix in bf16 but computes in this)."""
        return self.hf.dtype

    @property
    def bos_token_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def site_names(self) -> list[str]:
        """Every valid site name of this model, in execution order."""
        return [Site(k, layer).name for layer in range(self.n_layers) for k in SITE_KINDS]

    def site(self, name: str | Site) -> Site:
        """Parse and validate a site name against this model (HookNotFoundError lists what is valid)."""
        return validate_site(name, self.n_layers)

    def site_width(self, site: str | Site) -> int:
        """Width of the activation vector at `site`."""
        return site_width(self.site(site), self.d_model, self.n_heads, self.head_dim, self.d_mlp)

    def tokenize(self, prompts: str | list[str], *, max_length: int | None = None, truncate: bool = False,
                 padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Tokenize with BOS, pad to a batch, and check lengths before any forward pass.

        Empty prompts (nothing but BOS) raise EmptyInputError. Prompts longer than `max_length`
        (default: the model's context) raise ContextLengthError unless `truncate=True`, which keeps the start.
        """
        if padding_side not in ("left", "right"):
            raise ArgumentError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise EmptyInputError("no prompts given: pass at least one non-empty string")
        limit = max_length or self.max_context
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        rows = []
        for i, toks in enumerate(ids):
            if toks and toks[0] == self.bos_token_id:
                toks = toks[1:]
            if not toks:
                raise EmptyInputError(f"prompt {i} ({prompts[i]!r}) has no tokens besides BOS; give it some text")
            toks = [self.bos_token_id, *toks]
            if len(toks) > limit:
                if not truncate:
                    raise ContextLengthError(
                        f"prompt {i} is {len(toks)} tokens (with BOS) but the limit is {limit}; "
                        f"pass truncate=True to keep the first {limit} tokens, or shorten it"
                    )
                toks = toks[:limit]
            rows.append(toks)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
            input_ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, family={self.family}, layers={self.n_layers}, d_model={self.d_model}, "
                f"dtype={self.dtype}, device={self.device})")


def _wrap(hf_model: torch.nn.Module, tokenizer: Any, name: str) -> Model:
    from nnsight import TransformersModel  # noqa: TID251 - the one place the base layer wraps a model for tracing

    cfg = hf_model.config
    family = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}.get(cfg.model_type)
    if family is None:
        raise ModelUnavailableError(
            f"{name}: model_type {cfg.model_type!r} is not a Gemma-2/Gemma-3 text model; supported: {SUPPORTED_FAMILIES}"
        )
    hf_model.eval()
    nn_model = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
    return Model(
        nn=nn_model, hf=hf_model, tokenizer=tokenizer, name=name, family=family,
        n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
        d_mlp=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        max_context=int(getattr(cfg, "max_position_embeddings", 8192)),
    )


def _default_dtype(device: torch.device, dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is not None:
        return resolve_dtype(dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmuls are slow on most CPUs


def _load_hf(path_or_id: str, device: torch.device, dtype: torch.dtype, local_only: bool,
             low_memory: bool = True) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path_or_id, local_files_only=local_only)
    # Gemma-2 soft-caps attention logits, which only the eager kernel implements.
    attn = "eager" if cfg.model_type == "gemma2" else "sdpa"
    def load_tokenizer() -> Any:
        tok = AutoTokenizer.from_pretrained(path_or_id, local_files_only=local_only)
        for name in ("_vocab", "_merges"):  # GemmaTokenizer keeps its 262k-entry sources after building (~140 MB)
            if isinstance(getattr(tok, name, None), (dict, list)):
                setattr(tok, name, type(getattr(tok, name))())
        return tok

    is_folder = Path(path_or_id).is_dir()
    tok = shared_tokenizer(path_or_id, load_tokenizer) if low_memory and is_folder else load_tokenizer()
    # fp32 on CPU from a bf16 checkpoint: load bf16 (no fp32 transient) and keep the tied embedding in bf16
    lean = (low_memory and device.type == "cpu" and dtype == torch.float32
            and is_bf16_checkpoint(path_or_id, cfg)
            and getattr(cfg, "tie_word_embeddings", False))
    model = AutoModelForCausalLM.from_pretrained(
        path_or_id, dtype=torch.bfloat16 if lean else dtype, attn_implementation=attn, local_files_only=local_only
    )
    if lean:
        keep_weights_bf16(model, dtype)
        return_freed_memory()
    return model.to(device), tok


def _weights_id(folder: Path) -> str | None:
    """Identity of a folder's weights from its manifest (converted default model, fine-tunes), if it has one."""
    try:
        files = json.loads((folder / "manifest.json").read_text())["files"]
        return manifest_weights_id(files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _hub_offline() -> str | None:
    """Why the hub cannot be reached now (offline switch set, or its host refuses a quick connection), else None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "0").strip().lower() not in ("0", "", "false", "no", "off"):
            return f"{var} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a direct probe says nothing behind a proxy: let the hub client try
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"{url.scheme}://{url.netloc} is unreachable ({e})"
    return None


def _load_folder(folder: Path, dev: torch.device, dt: torch.dtype, low_memory: bool, name: str) -> Model:
    if not (folder / "config.json").is_file():
        raise ModelUnavailableError(f"{folder}: not a model folder (no config.json); a Hugging Face model folder "
                                    "holds config.json, the tokenizer files and *.safetensors weights")
    model, tok = _load_hf(str(folder), dev, dt, local_only=True, low_memory=low_memory)
    wrapped = _wrap(model, tok, name)
    weights = _weights_id(folder)
    if weights:
        wrapped.extra["weights_sha256"] = weights
    return wrapped


def load_model(name_or_path: str = "default", device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, *, progress: bool = True,
               low_memory: bool | None = None, remote: bool | str = False) -> Model:
    """Load "default" (the embedded Gemma 3 270M), a Hugging Face id, or a local folder.

    The default model is converted once into the user cache (see `toolkit.paths.cache_dir`) and checked against
    its manifest on every load. A hub id that is neither cached nor downloadable raises ModelUnavailableError
    saying how to fix it, at once when offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, or the hub unreachable).
    On CPU in fp32 from a bf16 checkpoint, `low_memory` keeps the embedding and linear weights in bf16 (frozen,
    shared with identical models; see `toolkit.lowmem`): same logits, half the weight memory, generation ~1.5x
    slower (each matmul casts its weight on every call). Off by default; `TOOLKIT_LOW_MEMORY=1` (Binder sets it)
    turns it on where `low_memory` is not given. `remote=True` (or an NDIF host URL) leaves the weights on the
    NDIF service and runs every toolkit trace there (toolkit.remote; needs NDIF_API_KEY and the network).
    """
    if remote:
        from toolkit.remote import load_remote

        return load_remote(name_or_path, remote)
    if low_memory is None:
        low_memory = os.environ.get("TOOLKIT_LOW_MEMORY", "0") == "1"
    dev = resolve_device(device, default="cuda" if torch.cuda.is_available() else "cpu")
    dt = _default_dtype(dev, dtype)
    if name_or_path == "default":
        return _load_folder(prepare_default_model(progress=progress), dev, dt, low_memory, "default")
    if Path(name_or_path).expanduser().is_dir():
        return _load_folder(Path(name_or_path).expanduser(), dev, dt, low_memory, str(name_or_path))
    offline = _hub_offline()
    try:
        model, tok = _load_hf(name_or_path, dev, dt, local_only=offline is not None, low_memory=low_memory)
    except OSError as e:
        why = f"offline ({offline}) and " if offline else ""
        raise ModelUnavailableError(
            f"cannot load {name_or_path!r}: not a local folder, {why}not in the Hugging Face cache, or the hub "
            f"could not be reached or refused access ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Go online and accept the model's licence on the hub (set HF_TOKEN for gated Gemma models), "
            "pass a local folder, or use load_model('default')."
        ) from e
    return _wrap(model, tok, name_or_path)


def tiny_gemma2(seed: int = 0, *, n_layers: int = 2, d_model: int = 64, sliding_window: int = 4) -> Model:
    """A random tiny Gemma-2 (soft-capping, local/global attention, pre/post norms) with an in-code tokenizer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tiny_tokenizer()
    cfg = Gemma2Config(
        vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=d_model // 4, max_position_embeddings=256,
        sliding_window=sliding_window, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        query_pre_attn_scalar=d_model // 4, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(cfg)
        with torch.no_grad():  # Gemma init leaves norms at 0 (= scale 1); give them some spread to test pre/post norms
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _wrap(model, tok, f"tiny-gemma2-seed{seed}")


_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Water boils at one hundred degrees. "
    "Paris is the capital of France. The cat sat on the mat. Numbers: 0 1 2 3 4 5 6 7 8 9. "
    "Sparse autoencoders find features in the residual stream of a language model. "
)


def tiny_tokenizer() -> Any:
    """A small byte-level BPE tokenizer trained in code, with Gemma's special tokens and BOS added."""
    return _tiny_tokenizer_cached()


def _tiny_tokenizer_cached(_cache: dict[str, Any] = {}) -> Any:  # noqa: B006 - process-wide memo
    if "tok" in _cache:
        return _cache["tok"]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    bos = core.token_to_id("<bos>")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    _cache["tok"] = tok
    return tok
