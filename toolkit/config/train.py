"""TrainConfig: how an SAE is trained (the shared settings are toolkit.config.optimization's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from toolkit.config._checks import reject_unknown_keys
from toolkit.config.optimization import Optimization, flag, fraction, non_negative, one_of, positive
from toolkit.config.sae import SAEConfig


def _positives(name: str, v: Any) -> None:
    if not isinstance(v, (tuple, list)) or not v:
        raise ValueError(f"{name} must be a non-empty tuple of numbers > 0, got {v!r}")
    for i, x in enumerate(v):
        positive(f"{name}[{i}]", x)


def _folds(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {v!r}")


# Each SAE-only field's own rule; None is accepted for the fields in _OPTIONAL.
_RULES: dict[str, Callable[[str, Any], None]] = {
    "l0_coefficient": non_negative, "target_l0": positive, "target_l0_rate": non_negative,
    "threshold_control_rate": non_negative, "bandwidth": positive, "init_threshold": positive,
    "threshold_lr_scale": positive, "unit_norm_decoder": flag, "init_b_dec": one_of("geometric_median", "mean", "zeros"),
    "adaptive_l1_coefficient": non_negative, "probe_loss_weight": non_negative, "joint_fraction": fraction,
    "probe_lambdas": _positives, "probe_folds": _folds,
}
_OPTIONAL = ("target_l0", "bandwidth", "init_threshold", "unit_norm_decoder")



@dataclass(frozen=True)
class TrainConfig(Optimization):
    """How to train one SAE: its config, the shared Optimization settings (keyword-only) and the SAE-only ones."""

    TUPLES = ("adam_betas", "hierarchical_budgets", "probe_lambdas")

    sae: SAEConfig
    """The SAE to train (architecture, d_in, d_sae, k, groups); its dtype must be float32 or float64."""

    l0_coefficient: float = 1.0
    """'jumprelu': weight of the L0 penalty (number of active latents per token, via straight-through estimators)."""

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

    unit_norm_decoder: bool | None = None
    """Keep decoder rows at unit norm (renormalized each step, parallel gradient removed). None: as the reference
    implementations do — True for topk (OpenAI), batchtopk, matryoshka and jumprelu (dictionary_learning's JumpReLU
    trainer too); False for relu, whose L1 is decoder-norm weighted (Anthropic, April 2024)."""

    init_b_dec: str = "geometric_median"
    """b_dec at step 0: 'geometric_median' or 'mean' of the first batch (normalized), or 'zeros'."""

    hierarchical_budgets: tuple[int, ...] | None = None
    """'hierarchical_topk': the budgets J (increasing, within 1..k) whose reconstruction errors the loss averages.
    None: every j in 1..k (the paper's choice)."""

    adaptive_l1_coefficient: float = 0.005
    """'adaptivek': weight λ of the L1 term E||f||₁ / E||x|| in the reference's units (its README: 0.005)."""

    probe_loss_weight: float = 0.05
    """'adaptivek': weight of the probe's loss in the joint phase (the reference's probe_weight)."""

    joint_fraction: float = 0.1
    """'adaptivek': fraction of the steps, at the end, in which the probe trains jointly with the SAE
    (the reference's 1 - phase_ratio); before it the probe stays as fitted in closed form."""

    probe_lambdas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    """'adaptivek': ridge penalties tried by cross-validation for the probe (the reference's grid)."""

    probe_folds: int = 5
    """'adaptivek': folds of the probe's cross-validation."""

    def __post_init__(self) -> None:
        if isinstance(self.sae, dict):
            object.__setattr__(self, "sae", SAEConfig.from_dict(self.sae))
        if not isinstance(self.sae, SAEConfig):
            raise ValueError(f"sae must be an SAEConfig, got {type(self.sae).__name__}")
        if self.sae.dtype not in ("float32", "float64"):
            raise ValueError(f"train in float32 or float64 (sae.dtype is {self.sae.dtype!r}); "
                             "cast the trained SAE afterwards, e.g. sae.to(torch.bfloat16)")
        super().__post_init__()
        for name, check in _RULES.items():
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL:
                check(name, value)
        self._check_architecture()

    def _check_architecture(self) -> None:
        """Rules that tie fields to the SAE's architecture."""
        arch = self.sae.architecture
        if self.threshold_control_rate and (arch != "jumprelu" or self.target_l0 is None):
            raise ValueError("threshold_control_rate moves JumpReLU thresholds towards target_l0; "
                             f"it needs architecture 'jumprelu' and a target_l0 (got {arch!r}, {self.target_l0!r})")
        if self.target_l0 is not None:
            if arch not in ("jumprelu", "relu"):
                raise ValueError(f"target_l0 adapts the sparsity coefficient of 'jumprelu'/'relu'; "
                                 f"{arch!r} sets its L0 with sae.k={self.sae.k}")
            if self.target_l0 > self.sae.d_sae:
                raise ValueError(f"target_l0={self.target_l0} is larger than d_sae={self.sae.d_sae}")
        budgets = self.hierarchical_budgets
        if budgets is not None:
            if arch != "hierarchical_topk":
                raise ValueError(f"hierarchical_budgets is for 'hierarchical_topk', not {arch!r}")
            budgets = tuple(budgets)
            if not budgets or any(isinstance(j, bool) or not isinstance(j, int) for j in budgets) or \
                    any(b <= a for a, b in zip(budgets[:-1], budgets[1:], strict=True)) or budgets[0] < 1 or budgets[-1] > self.sae.k:
                raise ValueError(f"hierarchical_budgets must be increasing integers within 1..k={self.sae.k}; "
                                 f"got {self.hierarchical_budgets!r}")
            object.__setattr__(self, "hierarchical_budgets", budgets)
        object.__setattr__(self, "probe_lambdas", tuple(self.probe_lambdas))
        if self.aux_k is not None:
            if arch not in ("topk", "batchtopk", "matryoshka", "hierarchical_topk", "adaptivek"):
                raise ValueError(f"aux_k is for top-k architectures (AuxK loss), not {arch!r}")
            if self.aux_k > self.sae.d_sae:
                raise ValueError(f"aux_k={self.aux_k} is larger than d_sae={self.sae.d_sae}")

    @property
    def jumprelu_bandwidth(self) -> float:
        """The bandwidth ε in use (bandwidth, or 0.001 * sqrt(d_in))."""
        return self.bandwidth if self.bandwidth is not None else 0.001 * self.sae.d_in ** 0.5

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
        return super().from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; `TrainConfig.from_dict(cfg.to_dict()) == cfg`."""
        return {**super().to_dict(), "sae": self.sae.to_dict()}
