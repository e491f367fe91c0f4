"""Crosscoder: one sparse dictionary over two models' activations at the same site (base, fine-tuned).

    pre      = sum_m (x_m * s_m) @ W_enc[m] + b_enc            x: (..., 2, d_in), s = input_scale (2,)
    codes    = act(pre)                                         'batchtopk' or 'relu'
    recon_m  = (codes @ W_dec[:, m] + b_dec[m]) / s_m

Latent j has one decoder direction per model, W_dec[j, 0] (base) and W_dec[j, 1] (fine-tuned); their norms tell
what is shared and what belongs to one model (toolkit.analysis.diff). Sparsity, as in dictionary_learning's
BatchTopKCrossCoder: latents are ranked by relu(pre_j) * (|W_dec[j,0]| + |W_dec[j,1]|). In training ('batchtopk',
`.train()` mode) the k * n_tokens largest over the batch are kept; at inference those above `threshold`
(estimated while training; before that, per-token top-k). 'relu' keeps every positive code (trained with L1).

`input_scale` holds the per-model scalar normalization of training, so a saved crosscoder reads raw activations.
It stays a buffer rather than being folded into the weights: folding would rescale each model's decoder by its own
factor, which changes the BatchTopK ranking and biases every decoder-norm ratio by s_base / s_ft.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from toolkit.config import CrosscoderConfig
from toolkit.crosscoder.loaders import read_dictionary_learning
from toolkit.crosscoder.paired import PairedActivations, cache_site
from toolkit.devices import resolve_device
from toolkit.dictionary import Dictionary
from toolkit.errors import CheckpointError, ShapeMismatchError, SiteMismatchError, check_finite
from toolkit.io import DTYPES, load_weight_folder, save_weight_folder
from toolkit.sites import Site

if TYPE_CHECKING:
    from toolkit.tracing import ActivationCache

WEIGHTS = "weights.safetensors"


class CrosscoderOutput(NamedTuple):
    """What `crosscoder(x)` returns."""

    reconstruction: torch.Tensor
    """(..., 2, d_in) reconstruction of both models' activations, in the units of x."""
    codes: torch.Tensor
    """(..., d_sae) latent activations, equal to crosscoder.encode(x)."""
    pre_activations: torch.Tensor
    """(..., d_sae) encoder output before the sparsity (for training losses)."""


class Crosscoder(Dictionary):
    """Crosscoder with W_enc (2, d_in, d_sae), b_enc (d_sae), W_dec (d_sae, 2, d_in), b_dec (2, d_in), and buffers
    `threshold` (scalar, 'batchtopk'; negative = not estimated) and `input_scale` (2,)."""

    def __init__(self, cfg: CrosscoderConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dt = DTYPES[cfg.dtype]
        self.W_enc = nn.Parameter(torch.empty(2, cfg.d_in, cfg.d_sae, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, 2, cfg.d_in, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(2, cfg.d_in, dtype=dt))
        if cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0, dtype=dt))
        self.register_buffer("input_scale", torch.ones(2, dtype=dt))
        self.reset_parameters(seed)
        self.eval()

    def encoder_from_decoder(self, w: torch.Tensor) -> torch.Tensor:
        """W_enc[m] = W_dec[:, m].T at initialization."""
        return w.permute(1, 2, 0)

    # ------------------------------------------------------------ the maths

    def code_weights(self) -> torch.Tensor:
        """(d_sae,) |W_dec[j, 0]| + |W_dec[j, 1]|: the weight of each code in the ranking and in the L1 penalty."""
        return self.W_dec.norm(dim=-1).sum(dim=-1)

    def pre_activations(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """(N, d_sae) encoder output for normalized rows (N, 2, d_in)."""
        return x_normalized.reshape(-1, 2 * self.d_in) @ self.W_enc.reshape(2 * self.d_in, self.d_sae) + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Codes (N, d_sae) from pre-activations: BatchTopK in training mode, the threshold at inference."""
        f = torch.relu(pre)
        if self.cfg.architecture == "relu":
            return f
        scaled = f * self.code_weights()
        if self.training:
            n = scaled.shape[0]
            kk = min(self.cfg.k * n, scaled.numel())
            idx = scaled.flatten().topk(kk, sorted=False).indices
            mask = torch.zeros(scaled.numel(), dtype=torch.bool, device=f.device)
            mask[idx] = True
            return f * mask.view_as(f)
        if float(self.threshold) >= 0:
            return f * (scaled > self.threshold)
        idx = scaled.topk(self.cfg.k, dim=-1).indices  # threshold not estimated yet: per-token top-k
        return f * torch.zeros_like(f, dtype=torch.bool).scatter_(-1, idx, True)

    def encode(self, x: torch.Tensor | PairedActivations) -> torch.Tensor:
        """Codes (..., d_sae) of paired activations x (..., 2, d_in)."""
        xn, lead = self._prepare(x)
        return self.activate(self.pre_activations(xn)).reshape(*lead, self.d_sae)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction (..., 2, d_in) of both models from codes (..., d_sae), in raw units."""
        codes = self._check(codes, (self.d_sae,), "codes")
        lead = codes.shape[:-1]
        out = self.decode_normalized(codes.reshape(-1, self.d_sae)) / self.input_scale[:, None]
        return out.reshape(*lead, 2, self.d_in)

    def decode_normalized(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, 2, d_in) reconstruction in the normalized units the crosscoder was trained in."""
        return (codes @ self.W_dec.reshape(self.d_sae, 2 * self.d_in)).view(-1, 2, self.d_in) + self.b_dec

    def forward(self, x: torch.Tensor | PairedActivations) -> CrosscoderOutput:
        """Encode then decode; see CrosscoderOutput."""
        xn, lead = self._prepare(x)
        pre = self.pre_activations(xn)
        codes = self.activate(pre)
        recon = self.decode_normalized(codes) / self.input_scale[:, None]
        return CrosscoderOutput(recon.reshape(*lead, 2, self.d_in), codes.reshape(*lead, self.d_sae),
                                pre.reshape(*lead, self.d_sae))

    def normalize(self, x: torch.Tensor | PairedActivations) -> torch.Tensor:
        """Rows (N, 2, d_in) of x in the crosscoder's normalized units (x * input_scale)."""
        return self._prepare(x)[0]

    def decoder_norms(self) -> torch.Tensor:
        """(d_sae, 2) norms of each latent's base and fine-tuned decoder directions (normalized units)."""
        return self.W_dec.detach().norm(dim=-1)

    # ------------------------------------------------------------ the guard (reliability case 15)

    def check_source(self, models: tuple[str, str] | None = None, site: str | Site | None = None,
                     d: int | None = None) -> None:
        """Refuse activations of another model pair, site or width, naming what this crosscoder expects."""
        want = f"{self.name} expects (base, fine-tuned) = {self.cfg.models}, site {self.cfg.site}, d_in {self.d_in}"
        if d is not None and d != self.d_in:
            raise ShapeMismatchError(f"{want}; got activations {d} wide")
        if models is not None and self.cfg.models is not None and tuple(models) != self.cfg.models:
            hint = " (swapped: pass the base model's activations first)" \
                if tuple(models)[::-1] == self.cfg.models else ""
            raise ValueError(f"{want}; got activations of models {tuple(models)}{hint}")
        if site is not None and self.cfg.site is not None and Site.parse(site).name != self.cfg.site:
            raise SiteMismatchError(f"{want}; got activations from site {Site.parse(site).name}")

    def check_caches(self, cache_base: ActivationCache, cache_ft: ActivationCache) -> None:
        """Apply `check_source` to two activation caches (their recorded model names, site and width)."""
        site = self.cfg.site
        for c in (cache_base, cache_ft):
            if site is not None and site not in c.sites:
                raise ValueError(f"{self.name} reads site {site}, but cache {str(c.folder)!r} holds {list(c.sites)}")
        name = site or cache_site(cache_base, None)
        self.check_source((cache_base.cfg.model, cache_ft.cfg.model), name, cache_base.width(name))

    # ------------------------------------------------------------ files

    def save(self, folder: str | os.PathLike) -> Path:
        """Write weights.safetensors + cfg.json + a sha256 manifest (written last) into `folder`."""
        return save_weight_folder(folder, self.state_dict(), {"kind": "crosscoder", **self.cfg.to_dict()},
                                  weights_name=WEIGHTS)

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> Crosscoder:
        """Load a folder written by `save`, verifying manifest, config, names, shapes and finiteness."""
        tensors, raw = load_weight_folder(folder, weights_name=WEIGHTS, device=resolve_device(device))
        if raw.pop("kind", None) != "crosscoder":
            raise CheckpointError(f"{Path(folder) / 'cfg.json'}: not a crosscoder config (no \"kind\": \"crosscoder\")")
        try:
            cfg = CrosscoderConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{Path(folder) / 'cfg.json'}: {e}") from e
        return cls.from_state_dict(cfg, tensors, source=str(Path(folder) / WEIGHTS))

    @classmethod
    def from_state_dict(cls, cfg: CrosscoderConfig, tensors: dict[str, torch.Tensor], *,
                        source: str = "state dict") -> Crosscoder:
        """Build strictly from tensors named as in `state_dict()`; CheckpointError naming `source` otherwise."""
        with torch.device("meta"):
            template = cls(cfg)
        want = {k: (tuple(v.shape), v.dtype) for k, v in template.state_dict().items()}
        if set(want) != set(tensors):
            raise CheckpointError(f"{source}: tensor names do not match a {cfg.architecture} crosscoder (missing "
                                  f"{sorted(set(want) - set(tensors))}, unexpected {sorted(set(tensors) - set(want))})")
        for name, (shape, dtype) in want.items():
            t = tensors[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise CheckpointError(f"{source}: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{source}: {name} has non-finite values")
        template.load_state_dict({k: v.detach().contiguous() for k, v in tensors.items()}, strict=True, assign=True)
        return template.eval()

    @classmethod
    def from_dictionary_learning(cls, path: str | os.PathLike, *, models: tuple[str, str] | None = None,
                                 site: str | None = None, dtype: str | None = None,
                                 device: str | torch.device = "cpu") -> Crosscoder:
        """Load a saprmarks/dictionary_learning `CrossCoder` or `BatchTopKCrossCoder` checkpoint over 2 models.

        `path`: a .pt / .safetensors state dict, or a folder with model.safetensors (the Hugging Face hub layout of
        the published crosscoders) or one .pt file, optionally beside config.json. Tensors: encoder.weight
        (2, d_in, d_sae), encoder.bias, decoder.weight (2, d_sae, d_in), decoder.bias (2, d_in); BatchTopK adds
        k and threshold. A newer checkpoint's activation normalizer (mean + global scale) is folded in exactly.
        A BatchTopK threshold never estimated (-1) gives per-token top-k here, where dictionary_learning keeps
        every positive code.
        """
        dev = resolve_device(device)  # before reading anything
        cfg, tensors, source = read_dictionary_learning(path, models=models, site=site, dtype=dtype)
        return cls.from_state_dict(cfg, tensors, source=source).to(dev)

    # ------------------------------------------------------------ small things

    @property
    def name(self) -> str:
        """Short description used in error messages."""
        return f"Crosscoder({self.cfg.architecture}, d_in={self.d_in}, d_sae={self.d_sae})"

    def extra_repr(self) -> str:
        return f"{self.name[11:-1]}, models={self.cfg.models}, site={self.cfg.site}"

    def _check(self, t: Any, tail: tuple[int, ...], what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.name}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim < len(tail) or tuple(t.shape[t.ndim - len(tail):]) != tail:
            raise ShapeMismatchError(f"{self.name}: {what} have shape {tuple(t.shape)}; expected (..., "
                                     f"{', '.join(map(str, tail))}){' (base, fine-tuned)' if len(tail) == 2 else ''}")
        if t.device != self.device:
            raise TypeError(f"{self.name}: {what} are on {t.device} but the crosscoder is on {self.device}; "
                            "move one of them")
        if not t.is_floating_point():
            raise TypeError(f"{self.name}: {what} must be floating point (cast to {self.dtype}); got {t.dtype}")
        return t.to(self.dtype)

    def _prepare(self, x: Any) -> tuple[torch.Tensor, torch.Size]:
        if isinstance(x, PairedActivations):
            self.check_source(x.models, x.site, x.d)
            x = x.acts
        elif isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[-1] != self.d_in:
            self.check_source(d=x.shape[-1])
        x = self._check(x, (2, self.d_in), "activations")
        lead = x.shape[:-2]
        return x.reshape(-1, 2, self.d_in) * self.input_scale[:, None], lead


def finite_source(source: PairedActivations | torch.Tensor) -> torch.Tensor:
    """The (n, 2, d) tensor of `source`, or NonFiniteError naming its site and models and the count of NaN/inf."""
    if isinstance(source, PairedActivations):
        what = f"paired activations at {source.site or 'an unknown site'} of {source.models or 'unknown models'}"
        return check_finite(source.acts, what)
    return check_finite(source, "paired activations (a tensor)") if isinstance(source, torch.Tensor) else source


def source_rows(cc: Crosscoder, source: PairedActivations | torch.Tensor | tuple) -> int:
    """Apply the crosscoder's guard to `source` and return its number of rows."""
    if isinstance(source, PairedActivations):
        cc.check_source(source.models, source.site, source.d)
        return len(source)
    if isinstance(source, torch.Tensor):
        if source.ndim != 3 or source.shape[1:] != (2, cc.d_in):
            raise ShapeMismatchError(f"{cc.name}: paired activations must be (n, 2, {cc.d_in}); got {tuple(source.shape)}")
        return source.shape[0]
    if isinstance(source, tuple) and len(source) == 2:
        cc.check_caches(*source)
        return source[0].n_tokens
    raise TypeError(f"source must be PairedActivations, a (n, 2, d) tensor or (base cache, ft cache); got "
                    f"{type(source).__name__}")
