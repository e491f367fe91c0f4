"""Optimization: the settings every trainer shares (SAEs and crosscoders), checked field by field in a table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from toolkit.config._checks import DictConfig, number, positive_int

DECAYS = ("none", "linear", "cosine")
OPERATIONAL_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "device", "max_consecutive_skips")
"""Fields a resumed run may change (cadence and placement, not the maths)."""


def positive(name: str, v: Any) -> None:
    """A number > 0."""
    number(name, v, low=0, low_open=True)


def non_negative(name: str, v: Any) -> None:
    """A number >= 0."""
    number(name, v, low=0)


def fraction(name: str, v: Any) -> None:
    """A number in [0, 1]."""
    number(name, v, low=0, high=1)


def count(name: str, v: Any) -> None:
    """An integer >= 0."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}")


def one_of(*choices: str) -> Callable[[str, Any], None]:
    """A rule accepting only `choices`."""
    def check(name: str, v: Any) -> None:
        if v not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {v!r}")
    return check


def flag(name: str, v: Any) -> None:
    """True or False."""
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")


def _betas(name: str, v: Any) -> None:
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise ValueError(f"{name} must be two numbers, got {v!r}")
    for i, b in enumerate(v):
        number(f"{name}[{i}]", b, low=0, high=1)
        if b == 1:
            raise ValueError(f"{name}[{i}] must be < 1, got {b!r}")


def _keep(name: str, v: Any) -> None:
    positive_int(name, v)
    if v < 2:
        raise ValueError(f"{name} must be >= 2 (the previous one is the fallback), got {v}")


def _device(name: str, v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a device name such as 'cpu' or 'cuda', got {v!r}")


# Each shared field's own rule; None is accepted for the fields in OPTIONAL_FIELDS.
FIELD_RULES: dict[str, Callable[[str, Any], None]] = {
    "lr": positive, "batch_size": positive_int, "total_steps": positive_int, "total_tokens": positive_int,
    "warmup_steps": count, "decay": one_of(*DECAYS), "decay_start": fraction, "min_lr_ratio": fraction,
    "adam_betas": _betas, "adam_eps": positive, "max_grad_norm": positive, "l1_coefficient": non_negative,
    "sparsity_warmup_steps": count, "aux_k": positive_int, "aux_k_coefficient": non_negative,
    "dead_after_tokens": positive_int, "threshold_beta": fraction, "normalize": flag,
    "normalize_batches": positive_int, "checkpoint_every": positive_int, "keep_checkpoints": _keep,
    "log_every": positive_int, "seed": count, "device": _device, "max_consecutive_skips": positive_int,
}
OPTIONAL_FIELDS = ("total_steps", "total_tokens", "max_grad_norm", "aux_k", "threshold_beta", "checkpoint_every")


@dataclass(frozen=True, kw_only=True)
class Optimization(DictConfig):
    """Schedule, Adam, clipping, sparsity warmup, AuxK, dead latents, normalization, checkpoints and logging:
    what `toolkit.training` needs from any trainer's config (TrainConfig for SAEs, CrosscoderTraining)."""

    TUPLES = ("adam_betas",)

    lr: float = 3e-4
    """Peak Adam learning rate (after warmup, before decay)."""

    batch_size: int = 4096
    """Tokens (activation rows) per optimizer step."""

    total_steps: int | None = None
    """Optimizer steps to train; give exactly one of total_steps and total_tokens."""

    total_tokens: int | None = None
    """Tokens to train on; total_steps = total_tokens // batch_size."""

    warmup_steps: int = 0
    """Linear learning-rate warmup from ~0 to lr over this many steps."""

    decay: str = "linear"
    """Learning-rate decay after decay_start: 'none', 'linear' (to min_lr_ratio * lr at the end) or 'cosine'."""

    decay_start: float = 0.8
    """Fraction of total_steps after which the decay begins (0.8: the last 20 %, as Anthropic and SAELens)."""

    min_lr_ratio: float = 0.0
    """Learning rate at the last step, as a fraction of lr."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2); "Jumping Ahead" uses (0.0, 0.999) for JumpReLU."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this before each step (None: no clipping). With the loss of normalized
    activations the norm is above 1 at every step, so this feeds Adam unit-norm gradients: its step size then does
    not shrink as the loss falls; short runs gain most."""

    l1_coefficient: float = 5.0
    """'relu': weight of the decoder-norm-weighted L1 penalty sum_i |f_i| * ||W_dec[i]|| (for crosscoders, the sum
    of the latent's two decoder norms)."""

    sparsity_warmup_steps: int = 0
    """Steps over which the L1/L0 coefficient rises linearly from 0 ("Jumping Ahead" warms λ up this way)."""

    aux_k: int | None = None
    """Top-k architectures: dead latents used by the AuxK loss (None: d_in // 2, as OpenAI and sparsify)."""

    aux_k_coefficient: float = 1 / 32
    """Top-k architectures: weight of the AuxK loss (OpenAI: 1/32); 0 turns it off."""

    dead_after_tokens: int = 10_000_000
    """A latent is dead when it has not fired in this many training tokens (OpenAI and sparsify: 10M)."""

    threshold_beta: float | None = None
    """'batchtopk'/'matryoshka': the inference threshold is the running mean of each batch's smallest selected
    activation (BatchTopK paper): a plain mean for the first 1/(1-beta) steps, then an exponential moving average
    of that horizon, so that batches from older weights stop counting. None: a horizon of a tenth of the run
    (at least 10 steps) — activations drift during training and a longer horizon lags behind them."""

    normalize: bool = True
    """Scale inputs by one scalar (per model, for crosscoders) so that E[||x||] = sqrt(d_in), estimated on the
    first batches; the trained module keeps it (folded into an SAE, as input_scale in a crosscoder), so it reads
    raw activations."""

    normalize_batches: int = 8
    """Batches used to estimate the normalization scale (they are then trained on as usual)."""

    checkpoint_every: int | None = None
    """Write a complete checkpoint every this many steps (needs out_dir); None: only the final one."""

    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk (older ones are deleted once a newer one is complete); at least 2."""

    log_every: int = 50
    """Append averaged metrics to the history every this many steps."""

    seed: int = 0
    """Seed of the initialization and of the data order (activation-cache shuffling)."""

    device: str = "cpu"
    """Device to train on ('cpu', 'cuda', 'cuda:1', ...)."""

    max_consecutive_skips: int = 100
    """Raise NonFiniteError after this many consecutive skipped steps (non-finite batches, losses or gradients)."""


    def __post_init__(self) -> None:
        if (self.total_steps is None) == (self.total_tokens is None):
            raise ValueError("give exactly one of total_steps and total_tokens, got "
                             f"total_steps={self.total_steps!r}, total_tokens={self.total_tokens!r}")
        for name, check in FIELD_RULES.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL_FIELDS:
                check(name, value)
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        if self.total_tokens is not None and self.total_tokens < self.batch_size:
            raise ValueError(f"total_tokens={self.total_tokens} is less than one batch ({self.batch_size})")
        for name in ("warmup_steps", "sparsity_warmup_steps"):
            if getattr(self, name) > self.n_steps:
                raise ValueError(f"{name}={getattr(self, name)} is longer than the run ({self.n_steps} steps)")

    @property
    def n_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.total_steps if self.total_steps is not None else self.total_tokens // self.batch_size

    @property
    def threshold_ema_beta(self) -> float:
        """The BatchTopK threshold's averaging factor in use (threshold_beta, or 1 - 1/max(10, n_steps // 10))."""
        return self.threshold_beta if self.threshold_beta is not None else 1 - 1 / max(10, self.n_steps // 10)



    def differences(self, other: Optimization) -> list[str]:
        """Fields (other than checkpoint/log cadence and device) whose values differ; a resume needs none."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in OPERATIONAL_FIELDS and a[k] != b[k]]


__all__ = ["DECAYS", "FIELD_RULES", "OPERATIONAL_FIELDS", "Optimization", "count", "flag", "fraction", "non_negative",
           "one_of", "positive"]
