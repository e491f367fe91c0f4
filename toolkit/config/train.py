"""TrainConfig: how an SAE is trained."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from toolkit.config._checks import number, positive_int, reject_unknown_keys
from toolkit.config.sae import SAEConfig

_TRAIN_DECAYS = ("none", "linear", "cosine")
_OPERATIONAL_TRAIN_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "device", "max_consecutive_skips")


@dataclass(frozen=True)
class TrainConfig:
    """How to train an SAE (toolkit.sae.train.train_sae); everything a resumed run must share with the first."""

    sae: SAEConfig
    """The SAE to train (architecture, d_in, d_sae, k, groups); its dtype must be float32 or float64."""

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
    not shrink as the loss falls (short runs gain most: width 4096, 100 steps, FVU 0.164 -> 0.091 for BatchTopK)."""

    l1_coefficient: float = 5.0
    """'relu': weight of the decoder-norm-weighted L1 penalty sum_i |f_i| * ||W_dec[i]||."""

    l0_coefficient: float = 1.0
    """'jumprelu': weight of the L0 penalty (number of active latents per token, via straight-through estimators)."""

    sparsity_warmup_steps: int = 0
    """Steps over which the L1/L0 coefficient rises linearly from 0 ("Jumping Ahead" warms λ up this way)."""

    target_l0: float | None = None
    """'jumprelu'/'relu': adapt the sparsity coefficient after its warmup so that L0 reaches this target
    (log-space integral control: log λ += target_l0_rate * log(L0 / target_l0) each step)."""

    target_l0_rate: float = 0.1
    """Gain of the target-L0 controller (change of log λ per step per unit of log(L0 / target))."""

    threshold_control_rate: float = 0.0
    """'jumprelu' with target_l0: also move every log-threshold by -rate * log(target / L0) each step after the
    sparsity warmup. Short runs need it: early on the reconstruction term raises thresholds faster than a
    shrinking λ can lower them, and latents far below θ get no gradient to come back (0: off)."""

    bandwidth: float | None = None
    """'jumprelu': width ε of the rectangle kernel of the threshold's straight-through estimators, in normalized
    units. None: 0.001 * sqrt(d_in), i.e. 0.001 at unit mean squared norm rescaled to this normalization."""

    init_threshold: float | None = None
    """'jumprelu': initial threshold of every latent (trained as log(threshold)), in normalized units.
    None: 0.001 * sqrt(d_in) (0.001 at unit mean squared norm, rescaled like the bandwidth),
    or with target_l0 each latent's quantile on the first batch at which it fires on target_l0 / d_sae of the
    tokens, so L0 starts at the target (log-thresholds move slowly under Adam, so 0.001 needs long runs)."""

    threshold_lr_scale: float = 1.0
    """'jumprelu': learning-rate multiplier of the log-thresholds. Adam moves log θ by about lr per step, so
    θ changes by at most a factor e^(lr·steps) in a run; short runs need a larger factor to let θ find its scale."""

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

    unit_norm_decoder: bool | None = None
    """Keep decoder rows at unit norm (renormalized each step, parallel gradient removed). None: as the reference
    implementations do — True for topk (OpenAI), batchtopk, matryoshka and jumprelu (dictionary_learning's JumpReLU
    trainer too); False for relu, whose L1 is decoder-norm weighted (Anthropic, April 2024)."""

    init_b_dec: str = "geometric_median"
    """b_dec at step 0: 'geometric_median' or 'mean' of the first batch (normalized), or 'zeros'."""

    normalize: bool = True
    """Scale inputs by one scalar so that E[||x||] = sqrt(d_in) (estimated on the first batches); folded into
    the saved SAE, which reads raw activations."""

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
        if isinstance(self.sae, dict):
            object.__setattr__(self, "sae", SAEConfig.from_dict(self.sae))
        if not isinstance(self.sae, SAEConfig):
            raise ValueError(f"sae must be an SAEConfig, got {type(self.sae).__name__}")
        if self.sae.dtype not in ("float32", "float64"):
            raise ValueError(f"train in float32 or float64 (sae.dtype is {self.sae.dtype!r}); "
                             "cast the trained SAE afterwards, e.g. sae.to(torch.bfloat16)")
        arch = self.sae.architecture
        topk_family = arch in ("topk", "batchtopk", "matryoshka")
        positive_int("batch_size", self.batch_size)
        if (self.total_steps is None) == (self.total_tokens is None):
            raise ValueError("give exactly one of total_steps and total_tokens, got "
                             f"total_steps={self.total_steps!r}, total_tokens={self.total_tokens!r}")
        if self.total_steps is not None:
            positive_int("total_steps", self.total_steps)
        else:
            positive_int("total_tokens", self.total_tokens)
            if self.total_tokens < self.batch_size:
                raise ValueError(f"total_tokens={self.total_tokens} is less than one batch ({self.batch_size})")
        number("lr", self.lr, low=0, low_open=True)
        for name in ("warmup_steps", "sparsity_warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
            if v > self.n_steps:
                raise ValueError(f"{name}={v} is longer than the run ({self.n_steps} steps)")
        if self.decay not in _TRAIN_DECAYS:
            raise ValueError(f"decay must be one of {', '.join(_TRAIN_DECAYS)}; got {self.decay!r}")
        number("decay_start", self.decay_start, low=0, high=1)
        number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        betas = tuple(self.adam_betas)
        if len(betas) != 2:
            raise ValueError(f"adam_betas must be two numbers, got {self.adam_betas!r}")
        for i, b in enumerate(betas):
            number(f"adam_betas[{i}]", b, low=0, high=1)
            if b == 1:
                raise ValueError(f"adam_betas[{i}] must be < 1, got {b!r}")
        object.__setattr__(self, "adam_betas", betas)
        number("adam_eps", self.adam_eps, low=0, low_open=True)
        if self.max_grad_norm is not None:
            number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        number("l1_coefficient", self.l1_coefficient, low=0)
        number("l0_coefficient", self.l0_coefficient, low=0)
        if self.bandwidth is not None:
            number("bandwidth", self.bandwidth, low=0, low_open=True)
        if self.init_threshold is not None:
            number("init_threshold", self.init_threshold, low=0, low_open=True)
        number("target_l0_rate", self.target_l0_rate, low=0)
        number("threshold_control_rate", self.threshold_control_rate, low=0)
        if self.threshold_control_rate and (arch != "jumprelu" or self.target_l0 is None):
            raise ValueError("threshold_control_rate moves JumpReLU thresholds towards target_l0; "
                             f"it needs architecture 'jumprelu' and a target_l0 (got {arch!r}, {self.target_l0!r})")
        number("threshold_lr_scale", self.threshold_lr_scale, low=0, low_open=True)
        number("aux_k_coefficient", self.aux_k_coefficient, low=0)
        if self.threshold_beta is not None:
            number("threshold_beta", self.threshold_beta, low=0, high=1)
        if self.target_l0 is not None:
            if arch not in ("jumprelu", "relu"):
                raise ValueError(f"target_l0 adapts the sparsity coefficient of 'jumprelu'/'relu'; "
                                 f"{arch!r} sets its L0 with sae.k={self.sae.k}")
            number("target_l0", self.target_l0, low=0, low_open=True)
            if self.target_l0 > self.sae.d_sae:
                raise ValueError(f"target_l0={self.target_l0} is larger than d_sae={self.sae.d_sae}")
        if self.aux_k is not None:
            if not topk_family:
                raise ValueError(f"aux_k is for top-k architectures (AuxK loss), not {arch!r}")
            positive_int("aux_k", self.aux_k)
            if self.aux_k > self.sae.d_sae:
                raise ValueError(f"aux_k={self.aux_k} is larger than d_sae={self.sae.d_sae}")
        positive_int("dead_after_tokens", self.dead_after_tokens)
        if self.unit_norm_decoder is not None and not isinstance(self.unit_norm_decoder, bool):
            raise ValueError(f"unit_norm_decoder must be True, False or None, got {self.unit_norm_decoder!r}")
        if self.init_b_dec not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"init_b_dec must be 'geometric_median', 'mean' or 'zeros'; got {self.init_b_dec!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")
        positive_int("normalize_batches", self.normalize_batches)
        if self.checkpoint_every is not None:
            positive_int("checkpoint_every", self.checkpoint_every)
        positive_int("keep_checkpoints", self.keep_checkpoints)
        if self.keep_checkpoints < 2:
            raise ValueError(f"keep_checkpoints must be >= 2 (the previous one is the fallback), "
                             f"got {self.keep_checkpoints}")
        positive_int("log_every", self.log_every)
        positive_int("max_consecutive_skips", self.max_consecutive_skips)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a device name such as 'cpu' or 'cuda', got {self.device!r}")

    @property
    def n_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.total_steps if self.total_steps is not None else self.total_tokens // self.batch_size

    @property
    def jumprelu_bandwidth(self) -> float:
        """The bandwidth ε in use (bandwidth, or 0.001 * sqrt(d_in))."""
        return self.bandwidth if self.bandwidth is not None else 0.001 * self.sae.d_in ** 0.5

    @property
    def threshold_ema_beta(self) -> float:
        """The BatchTopK threshold's averaging factor in use (threshold_beta, or 1 - 1/max(10, n_steps // 10))."""
        return self.threshold_beta if self.threshold_beta is not None else 1 - 1 / max(10, self.n_steps // 10)

    @property
    def decoder_unit_norm(self) -> bool:
        """Whether decoder rows are kept at unit norm (unit_norm_decoder, or the architecture's default)."""
        if self.unit_norm_decoder is not None:
            return self.unit_norm_decoder
        return self.sae.architecture != "relu"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (with `sae` a dict or an SAEConfig); unknown keys raise ValueError listing the valid ones."""
        reject_unknown_keys(cls, d)
        if "sae" not in d:
            raise ValueError("TrainConfig needs key 'sae' (an SAEConfig or its dict)")
        d = dict(d)
        if isinstance(d["sae"], dict):
            d["sae"] = SAEConfig.from_dict(d["sae"])
        if isinstance(d.get("adam_betas"), list):
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; `TrainConfig.from_dict(cfg.to_dict()) == cfg`."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**d, "sae": self.sae.to_dict(), "adam_betas": list(self.adam_betas)}

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields (other than checkpoint/log cadence and device) whose values differ; a resume needs none."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in _OPERATIONAL_TRAIN_FIELDS and a[k] != b[k]]
