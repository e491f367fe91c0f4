"""The sparse autoencoder: one module for every architecture in toolkit.sae.architectures.

    codes = act(((x * input_scale) - b_dec?) @ W_enc + b_enc)        act: the architecture
    recon = (codes @ W_dec + b_dec) / input_scale

Dtype/device rule (for activations and codes alike): the input must be on the SAE's device; a floating input
of another dtype is cast to the SAE's dtype, and outputs come back in the SAE's dtype. Anything else (another
device, an integer tensor, not a tensor) raises TypeError naming both sides; a wrong last dimension raises
ShapeMismatchError. SAEs start in eval mode (inference semantics); a trainer calls `.train()`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

import toolkit.kernels as kernels
import toolkit.sae.formats as formats
from toolkit.config import SAEConfig
from toolkit.devices import resolve_device
from toolkit.dictionary import Dictionary
from toolkit.errors import (
    ArgumentError,
    CheckpointError,
    FeatureIndexError,
    ModelMismatchWarning,
    ShapeMismatchError,
    SiteMismatchError,
    check_index,
)
from toolkit.io import DTYPES, MANIFEST, Weights, load_weight_folder, save_weight_folder
from toolkit.sae.architectures import Budget, get_architecture, pre_activations
from toolkit.sae.budgets import PROBE_INIT_BIAS, check_k, complexity, resolve_budget
from toolkit.sites import Site

if TYPE_CHECKING:
    from toolkit.models import Model

JUMPRELU_INIT_THRESHOLD = 0.001  # "Jumping Ahead" (JumpReLU paper), appendix: initial threshold
WEIGHTS = "weights.safetensors"


class SAEOutput(NamedTuple):
    """What `sae(x)` returns; every field keeps x's leading dimensions."""

    reconstruction: torch.Tensor
    """(..., d_in) decode(codes), in the units of x (input_scale undone)."""
    codes: torch.Tensor
    """(..., d_sae) dense latent activations, equal to sae.encode(x)."""
    pre_activations: torch.Tensor
    """(..., d_sae) encoder output before the architecture's activation (for training losses)."""


class SparseCodes(NamedTuple):
    """Active latents of each token: `values[..., j]` is the code of latent `indices[..., j]`."""

    indices: torch.Tensor
    """(..., kmax) int64 latent indices; padding entries are index 0 with value 0."""
    values: torch.Tensor
    """(..., kmax) code values, in the SAE's dtype."""


class SAE(Dictionary):
    """Sparse autoencoder with parameters W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec.

    Architectures with a threshold also hold `threshold`: a learned Parameter of shape (d_sae,) for 'jumprelu',
    an estimated scalar buffer for 'batchtopk'/'matryoshka' (negative = not estimated yet). The scalar buffer
    `input_scale` multiplies inputs before encoding and divides reconstructions, so an SAE trained on
    normalized activations reads raw ones (1.0 unless set).
    """

    def __init__(self, cfg: SAEConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.arch = get_architecture(cfg.architecture)
        dt = DTYPES[cfg.dtype]
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt))
        if self.arch.threshold == "latent":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), JUMPRELU_INIT_THRESHOLD, dtype=dt))
        elif self.arch.threshold == "scalar":
            self.register_buffer("threshold", torch.tensor(-1.0, dtype=dt))
        if self.arch.has_probe:  # adaptivek: complexity s = clamp(x · probe_weight + probe_bias, 0, 1) sets k
            self.probe_weight = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt))
            self.probe_bias = nn.Parameter(torch.full((), PROBE_INIT_BIAS, dtype=dt))
        self.register_buffer("input_scale", torch.tensor(1.0, dtype=dt))
        self.inference_k: int | None = None  # see with_k
        self.reset_parameters(seed)
        self.eval()

    def encoder_from_decoder(self, w: torch.Tensor) -> torch.Tensor:
        """W_enc = W_dec.T at initialization."""
        return w.T

    # ------------------------------------------------------------ construction and files

    @classmethod
    def from_config(cls, cfg: SAEConfig, *, seed: int | None = None,
                    device: str | torch.device | None = None) -> SAE:
        """A freshly initialized SAE (see reset_parameters) on `device` (default CPU)."""
        with resolve_device(device):
            return cls(cfg, seed=seed)

    @classmethod
    def from_state_dict(cls, cfg: SAEConfig, tensors: dict[str, torch.Tensor], *, source: str = "state dict") -> SAE:
        """Build strictly from tensors named as in `state_dict()` (used as the parameters, made contiguous, not
        copied otherwise); CheckpointError naming `source` for a missing, extra, misshapen or non-finite one."""
        with torch.device("meta"):
            template = cls(cfg)
        want = {k: (tuple(v.shape), v.dtype) for k, v in template.state_dict().items()}
        missing = sorted(set(want) - set(tensors))
        extra = sorted(set(tensors) - set(want))
        if missing or extra:
            raise CheckpointError(
                f"{source}: tensor names do not match a {cfg.architecture} SAE "
                f"(missing {missing}, unexpected {extra}; expected {sorted(want)})"
            )
        for name, (shape, dtype) in want.items():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"{source}: {name} has shape {tuple(t.shape)}, expected {shape} for d_in={cfg.d_in}, d_sae={cfg.d_sae}"
                )
            if t.dtype != dtype:
                raise CheckpointError(f"{source}: {name} is {t.dtype}, but the config says {cfg.dtype}")
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CheckpointError(f"{source}: {name} has {bad} non-finite value(s) (NaN or inf)")
        template.load_state_dict({k: v.detach().contiguous() for k, v in tensors.items()}, strict=True, assign=True)
        return template.eval()

    def save(self, folder: str | os.PathLike) -> Path:
        """Write weights.safetensors + cfg.json + a sha256 manifest (written last) into `folder`."""
        return save_weight_folder(folder, self.state_dict(), self.cfg.to_dict(), weights_name=WEIGHTS)

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
        """Load a folder written by `save`, verifying the manifest, config, names, shapes and finiteness."""
        folder, device = Path(folder), resolve_device(device)
        if folder.is_dir() and not (folder / MANIFEST).exists():
            for name, how in (("sae_weights.safetensors", "SAE.from_saelens"), ("params.npz", "SAE.from_gemma_scope"),
                              ("sae.safetensors", "SAE.from_sparsify"), ("ae.pt", "SAE.from_dictionary_learning")):
                if (folder / name).exists():
                    raise CheckpointError(f"{folder}: no {MANIFEST}, but {name} is there; load it with {how}")
        tensors, cfg_dict = load_weight_folder(folder, weights_name=WEIGHTS, device=device)
        try:
            cfg = SAEConfig.from_dict(cfg_dict)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / 'cfg.json'}: {e}") from e
        return cls.from_state_dict(cfg, tensors, source=str(folder / WEIGHTS))

    @classmethod
    def from_weights(cls, weights: Weights, device: str | torch.device = "cpu") -> SAE:
        """Build from a format reader's Weights (toolkit.sae.formats), strictly, on `device`."""
        return cls.from_state_dict(weights.cfg, weights.tensors, source=weights.source).to(resolve_device(device))

    @classmethod
    def from_gemma_scope(cls, path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                         **kwargs: Any) -> SAE:
        """Gemma Scope params.npz (a path), or release=/layer=/width=/l0=/local_dir= (see formats.gemma_scope_path)."""
        dev = resolve_device(device)  # before reading anything
        return cls.from_weights(formats.read_gemma_scope(path, **kwargs), dev)

    @classmethod
    def from_saelens(cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu", **kwargs: Any) -> SAE:
        """A SAELens folder: cfg.json + sae_weights.safetensors (see formats.read_saelens)."""
        dev = resolve_device(device)  # before reading anything
        return cls.from_weights(formats.read_saelens(folder, **kwargs), dev)

    @classmethod
    def from_sparsify(cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu", **kwargs: Any) -> SAE:
        """An EleutherAI sparsify hookpoint folder: cfg.json + sae.safetensors (see formats.read_sparsify)."""
        dev = resolve_device(device)  # before reading anything
        return cls.from_weights(formats.read_sparsify(folder, **kwargs), dev)

    @classmethod
    def from_dictionary_learning(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                                 **kwargs: Any) -> SAE:
        """A saprmarks/dictionary_learning folder (ae.pt + config.json) or its ae.pt (see formats.read_dictionary_learning)."""
        dev = resolve_device(device)  # before reading anything
        return cls.from_weights(formats.read_dictionary_learning(path, **kwargs), dev)

    # ------------------------------------------------------------ the maths

    def encode(self, x: torch.Tensor, *, k: Any = None) -> torch.Tensor:
        """Dense codes (..., d_sae) of activations x (..., d_in). `k` (top-k family): active latents per token,
        an int in 1..cfg.k or an integer tensor of x's leading shape (default: cfg.k, adaptivek's probe, or with_k)."""
        xin, lead = self._prepare(x)
        return _with_budget(self.arch.encode, self, xin, self._budget(xin, k, lead)).reshape(*lead, self.d_sae)

    def decode(self, codes: torch.Tensor, *, width: int | None = None) -> torch.Tensor:
        """Reconstruction (..., d_in) of dense codes (..., d_sae); `width` keeps only the first latents
        (a Matryoshka prefix, see cfg.matryoshka_groups)."""
        codes = self._check_input(codes, self.d_sae, "codes")
        lead = codes.shape[:-1]
        flat, W_dec = codes.reshape(-1, self.d_sae), self.W_dec
        if width is not None:
            w = self._check_width(width)
            flat, W_dec = flat[:, :w], W_dec[:w]
        out = kernels.decode_dense(flat, W_dec, self.b_dec) / self.input_scale
        return out.reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor, *, k: Any = None) -> SAEOutput:
        """Encode then decode; see SAEOutput (and encode for `k`)."""
        xin, lead = self._prepare(x)
        pre = pre_activations(self, xin)
        codes = _with_budget(self.arch.activate, self, pre, self._budget(xin, k, lead))
        recon = kernels.decode_dense(codes, self.W_dec, self.b_dec) / self.input_scale
        return SAEOutput(recon.reshape(*lead, self.d_in), codes.reshape(*lead, self.d_sae),
                         pre.reshape(*lead, self.d_sae))

    def encode_sparse(self, x: torch.Tensor, *, k: Any = None) -> SparseCodes:
        """The nonzero codes of x (..., d_in) as SparseCodes (..., kmax); same values as encode(x, k=k).

        An empty batch (no rows) gives empty SparseCodes of shape (..., kmax) (kmax = k for TopK, else 1)."""
        xin, lead = self._prepare(x)
        indices, values = _with_budget(self.arch.encode_sparse, self, xin, self._budget(xin, k, lead))
        kmax = indices.shape[-1]  # explicit: reshape(..., -1) is ambiguous for 0 rows
        return SparseCodes(indices.reshape(*lead, kmax), values.reshape(*lead, kmax))

    # ------------------------------------------------------------ budgets (top-k family)

    def with_k(self, k: int | None) -> SAE:
        """This SAE (parameters shared) encoding with `k` active latents per token by default — e.g. a
        HierarchicalTopK SAE at budget k for splicing or metrics; None restores the architecture's default."""
        other = self.at_site(self.cfg.site) if self.cfg.site is not None else self._shared_copy()
        other.inference_k = None if k is None else self._check_k(k)
        return other

    def complexity(self, x: torch.Tensor) -> torch.Tensor:
        """'adaptivek': the probe's complexity s in [0, 1] of activations x (..., d_in), shape (...)."""
        self._need_probe("complexity")
        xin, lead = self._prepare(x)
        return complexity(self, xin).reshape(lead)

    def budget(self, x: torch.Tensor) -> torch.Tensor:
        """Active latents each row of x (..., d_in) gets by default (int64, shape (...)): cfg.k for TopK and
        HierarchicalTopK, the probe's k for AdaptiveK, with_k's k if set."""
        if not self.arch.takes_k:
            raise ArgumentError(f"{self.name} has no per-token budget k (architecture {self.cfg.architecture!r})")
        xin, lead = self._prepare(x)
        k = self._budget(xin, None, lead)
        return (k if isinstance(k, torch.Tensor) else torch.full((xin.shape[0],), k, device=xin.device)).reshape(lead)

    def set_probe(self, weight: torch.Tensor, bias: float | torch.Tensor) -> SAE:
        """'adaptivek': use the linear complexity probe s = clamp(x · weight + bias, 0, 1) on raw activations."""
        self._need_probe("set_probe")
        if not isinstance(weight, torch.Tensor) or weight.reshape(-1).shape[0] != self.d_in or \
                weight.squeeze().ndim > 1:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ShapeMismatchError(f"{self.name}: the complexity probe reads {self.d_in}-wide activations; "
                                     f"its weight must have {self.d_in} entries, got {shape}")
        w = weight.detach().reshape(-1).to(self.probe_weight)
        b = torch.as_tensor(bias, dtype=self.probe_bias.dtype, device=self.probe_bias.device).reshape(())
        with torch.no_grad():  # the probe reads x * input_scale: fold the scale out of the weight
            self.probe_weight.copy_(w / self.input_scale)
            self.probe_bias.copy_(b)
        return self

    def _need_probe(self, what: str) -> None:
        if not self.arch.has_probe:
            raise ArgumentError(f"{self.name}: {what} needs an 'adaptivek' SAE (it has no complexity probe)")

    def _check_k(self, k: Any) -> int:
        return check_k(self, k)

    def _budget(self, xin: torch.Tensor, k: Any, lead: torch.Size) -> Budget:
        return resolve_budget(self, xin, k, lead)

    def decode_sparse(self, sparse: SparseCodes | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Reconstruction (..., d_in) from SparseCodes; reads only the active decoder rows (differentiable)."""
        indices, values = sparse
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{self.name}: sparse indices must be an integer (int64) tensor, got {_describe(indices)}")
        values = self._check_input(values, None, "sparse values")
        if indices.shape != values.shape or indices.device != values.device:
            raise ShapeMismatchError(
                f"{self.name}: sparse indices {tuple(indices.shape)} on {indices.device} and values "
                f"{tuple(values.shape)} on {values.device} must have the same shape and device"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.d_sae):
            raise FeatureIndexError(
                f"{self.name}: sparse indices span {int(indices.min())}..{int(indices.max())}; "
                f"valid latents are 0..{self.d_sae - 1}"
            )
        lead, kmax = indices.shape[:-1], indices.shape[-1]
        out = kernels.decode_sparse(indices.reshape(-1, kmax).long(), values.reshape(-1, kmax), self.W_dec, self.b_dec)
        return (out / self.input_scale).reshape(*lead, self.d_in)


    # ------------------------------------------------------------ checks

    def check_feature(self, i: Any) -> int:
        """Return `i` as an int if it is a valid latent index, else raise FeatureIndexError with the valid range."""
        return check_index(i, self.d_sae, "feature index", self.name)

    def check_compatible(self, model: Model, site: str | Site | None = None, *,
                         allow_other_site: bool = False) -> Site:
        """Validate `site` (default: cfg.site) on `model` before any run, against what the config records.

        Width ≠ d_in: ShapeMismatchError naming both. Another site than cfg.site: SiteMismatchError, unless
        `allow_other_site` (or use `sae.at_site(site)`, the explicit relabel). Another model name than cfg.model
        (same width): a ModelMismatchWarning, since a fine-tune or a local copy of the same model is legitimate.
        """
        if site is None and self.cfg.site is None:
            raise ValueError(f"{self.name} does not know its site; pass site='blocks.<layer>.<kind>'")
        s = model.site(site if site is not None else self.cfg.site)
        width = int(model.site_width(s))
        if width != self.d_in:
            trained = f" (trained on {self.cfg.site or 'an unknown site'} of {self.cfg.model or 'an unknown model'})"
            raise ShapeMismatchError(
                f"{self.name}{trained} reads {self.d_in}-wide activations, but site {s.name} of model "
                f"{getattr(model, 'name', model)!s} is {width} wide; use an SAE whose d_in is {width}"
            )
        if self.cfg.site is not None and Site.parse(self.cfg.site).name != s.name and not allow_other_site:
            raise SiteMismatchError(
                f"{self.name} was trained on {self.cfg.site}, not {s.name}; leave site= out to read "
                f"{self.cfg.site}, or use sae.at_site({s.name!r}) to read {s.name} on purpose"
            )
        name = str(getattr(model, "name", ""))
        if self.cfg.model and name and not same_model_name(self.cfg.model, name):
            warnings.warn(ModelMismatchWarning(
                f"{self.name} was trained on model {self.cfg.model!r} but is used with {name!r} (same width "
                f"{width} at {s.name}); its features may not mean the same there"), stacklevel=3)
        return s

    def at_site(self, site: str | Site) -> SAE:
        """This SAE (the same parameter tensors, shared) relabelled to read `site`: the explicit way to use it at
        a site other than the one it was trained on."""
        return self._shared_copy(dataclasses.replace(self.cfg, site=Site.parse(site).name))

    def _shared_copy(self, cfg: SAEConfig | None = None) -> SAE:
        other = type(self).from_state_dict(cfg or self.cfg, dict(self.state_dict(keep_vars=False)), source=self.name)
        other.inference_k = self.inference_k
        return other.train(self.training)

    # ------------------------------------------------------------ small things

    @property
    def name(self) -> str:
        """Short description used in error messages."""
        where = "".join(f", {k}={v}" for k, v in (("site", self.cfg.site), ("model", self.cfg.model)) if v)
        return f"SAE({self.cfg.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{where})"

    def extra_repr(self) -> str:
        return self.name[4:-1]

    def _check_width(self, width: Any) -> int:
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= self.d_sae:
            raise ValueError(f"width must be an integer in 1..{self.d_sae}; got {width!r}")
        return width

    def _check_input(self, t: Any, width: int | None, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.name}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if width is not None and (t.ndim == 0 or t.shape[-1] != width):
            raise ShapeMismatchError(f"{self.name}: {what} have shape {tuple(t.shape)}; the last dimension must be {width}")
        if t.device != self.device:
            raise TypeError(
                f"{self.name}: {what} are on {t.device} but the SAE is on {self.device}; "
                f"move one of them (x.to(sae.device) or sae.to(x.device))"
            )
        if not t.is_floating_point():
            raise TypeError(f"{self.name}: {what} must be floating point (cast to {self.dtype}); got {t.dtype}")
        return t.to(self.dtype)

    def _prepare(self, x: Any) -> tuple[torch.Tensor, torch.Size]:
        x = self._check_input(x, self.d_in, "activations")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d_in) * self.input_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, lead


def _with_budget(method: Any, sae: SAE, t: torch.Tensor, k: Budget) -> Any:
    """Call an architecture's method, passing k only when there is one (architectures registered by users before
    budgets existed define activate(sae, pre))."""
    return method(sae, t) if k is None else method(sae, t, k)


def same_model_name(recorded: str, used: str) -> bool:
    """Whether two model names are the same model: equal, or equal last path parts (a hub id and its local folder)."""
    last = lambda n: n.rstrip("/").rsplit("/", 1)[-1].lower()  # noqa: E731
    return recorded == used or last(recorded) == last(used)


def _describe(t: Any) -> str:
    return f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
