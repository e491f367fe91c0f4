"""SAE training for every architecture: `train_sae(cfg, source, out_dir=..., resume=...)`, on the shared loop
of toolkit.training.trainer.

What is SAE-specific: the architecture's objective (toolkit.training.objectives); decoder rows kept at unit norm
where the architecture's paper does so (TrainConfig.decoder_unit_norm); JumpReLU thresholds trained as log θ;
AdaptiveK's complexity probe (toolkit.training.probe_phase); b_dec started at the geometric median (or mean) of
the first batch.

Normalization: one scalar s with E||s·x|| = sqrt(d_in) on the first `normalize_batches` batches; on save it is
folded into the SAE (b_enc, b_dec and thresholds divided by s, so codes come out in raw units and decoder rows
keep unit norm). Target L0 (jumprelu/relu): after the sparsity warmup, log λ += target_l0_rate · log(L0/target)
every step (integral control on the batch L0, clamped to e^±10 around the configured λ).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import toolkit.training.budget_objectives  # noqa: F401  (registers the hierarchical_topk and adaptivek objectives)
from toolkit.config import TrainConfig
from toolkit.errors import CheckpointError, NonFiniteError
from toolkit.sae.sae import JUMPRELU_INIT_THRESHOLD, SAE
from toolkit.training.batches import BatchStream, Source, sae_stream
from toolkit.training.complexity import ComplexityData
from toolkit.training.objectives import LossContext, LossOutput, get_objective
from toolkit.training.probe_phase import ProbePhase
from toolkit.training.trainer import Run, TrainResult, fit, lr_at

SAE_DIR = "sae"
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
_MAX_LOG_COEF = 10.0  # the target-L0 controller keeps λ within e^±10 of its configured value (no wind-up)

__all__ = ["SAE_DIR", "SAERun", "TrainResult", "geometric_median", "lr_at", "train_sae"]


def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Geometric median of the rows of x (Weiszfeld's algorithm, started at the mean)."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            return new
        y = new
    return y


class SAERun(Run):
    """Training state of one SAE (see Run for what is shared)."""

    name = SAE_DIR

    def __init__(self, cfg: TrainConfig, complexity: ComplexityData | None = None) -> None:
        super().__init__(cfg, cfg.sae.d_sae, cfg.aux_k or cfg.sae.d_in // 2)
        self.arch = cfg.sae.architecture
        self.objective_fn = get_objective(self.arch)
        self.sae = SAE.from_config(cfg.sae, seed=cfg.seed, device=cfg.device).train()
        self.log_threshold: nn.Parameter | None = None
        if self.arch == "jumprelu":
            self.sae.threshold.requires_grad_(False)
            init = cfg.init_threshold or JUMPRELU_INIT_THRESHOLD * math.sqrt(cfg.sae.d_in)
            self.log_threshold = nn.Parameter(torch.full_like(self.sae.b_enc, math.log(init)))
        if not cfg.decoder_unit_norm:  # Anthropic's init for the free decoder: rows of norm 0.1, W_enc = W_dec^T
            with torch.no_grad():
                self.sae.W_dec.mul_(0.1)
                self.sae.W_enc.copy_(self.sae.W_dec.T)
        groups = [{"params": [getattr(self.sae, n) for n in _PARAMS], "lr_scale": 1.0}]
        if self.log_threshold is not None:
            groups.append({"params": [self.log_threshold], "lr_scale": cfg.threshold_lr_scale})
        self.probe = ProbePhase(cfg, self.sae, complexity) if self.sae.arch.has_probe else None
        if self.probe is not None:
            groups.append({"params": self.probe.params(), "lr_scale": 1.0})
        self.setup_optimizer(groups)
        self.scale, self.log_coef = 1.0, 0.0

    # ---- initialization from the first batches

    def initialize(self, stream: BatchStream) -> None:
        cfg = self.cfg
        need = cfg.normalize_batches if cfg.normalize else int(cfg.init_b_dec != "zeros" or cfg.target_l0 is not None)
        batches = [b for b in stream.peek(need) if bool(torch.isfinite(b).all())]
        if need and not batches:
            raise NonFiniteError(f"none of the first {need} batches is finite: cannot estimate the normalization "
                                 "scale or initialize b_dec")
        if cfg.normalize:
            norms = torch.cat([b.to(torch.float64).norm(dim=1) for b in batches])
            self.scale = float(math.sqrt(cfg.sae.d_in) / norms.mean().clamp_min(1e-12))
        if cfg.init_b_dec != "zeros":
            sample = batches[0][:4096].to(torch.float64) * self.scale
            center = geometric_median(sample) if cfg.init_b_dec == "geometric_median" else sample.mean(0)
            with torch.no_grad():
                self.sae.b_dec.copy_(center.to(self.sae.b_dec))
        if self.log_threshold is not None and cfg.init_threshold is None and cfg.target_l0 is not None:
            self._init_thresholds(batches[0])
        if self.probe is not None:
            self.probe.fit(self.scale)

    @torch.no_grad()
    def _init_thresholds(self, batch: torch.Tensor) -> None:
        """Each latent's threshold at the quantile where it fires on target_l0 / d_sae of the batch's tokens."""
        cfg, sae = self.cfg, self.sae
        x = batch.to(sae.b_dec) * self.scale
        pre = torch.addmm(sae.b_enc, x - sae.b_dec if cfg.sae.apply_b_dec_to_input else x, sae.W_enc)
        above = max(1, round(pre.shape[0] * cfg.target_l0 / cfg.sae.d_sae))
        theta = pre.kthvalue(max(pre.shape[0] - above, 1), dim=0).values  # `above` tokens exceed it
        self.log_threshold.copy_(theta.clamp_min(JUMPRELU_INIT_THRESHOLD).log())

    # ---- one step

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=self.sae.dtype) * self.scale

    def coefficient(self) -> float:
        base = {"relu": self.cfg.l1_coefficient, "jumprelu": self.cfg.l0_coefficient,
                "adaptivek": self.cfg.adaptive_l1_coefficient}.get(self.arch, 0.0)
        return base * self.sparsity_warmup() * math.exp(self.log_coef)

    def loss_context(self, dead: torch.Tensor) -> LossContext:
        return LossContext(self.coefficient(), self.log_threshold, self.cfg.jumprelu_bandwidth, dead, self.aux_k,
                           self.cfg.aux_k_coefficient, self.cfg.hierarchical_budgets)

    def objective(self, x: torch.Tensor, ctx: LossContext) -> LossOutput:
        out = self.objective_fn(self.sae, x, ctx)
        if self.probe is not None and self.probe.joint(self.step):
            out = out._replace(loss=out.loss + self.probe.term(self.step, self.scale))
        return out

    def constrain_gradients(self) -> None:
        W = self.sae.W_dec
        if self.cfg.decoder_unit_norm and W.grad is not None:  # keep ||W_dec[i]|| = 1: drop the radial gradient
            W.grad -= (W.grad * W.detach()).sum(1, keepdim=True) * W.detach()

    def after_update(self) -> None:
        if self.probe is not None and self.probe.joint(self.step):
            self.probe.after_update()
        if self.cfg.decoder_unit_norm:
            with torch.no_grad():
                W = self.sae.W_dec
                W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def threshold(self) -> torch.Tensor | None:
        return self.sae.threshold if self.arch in ("batchtopk", "matryoshka") else None

    def observe_l0(self, l0: float) -> None:
        cfg = self.cfg
        if cfg.target_l0 is not None and self.step > cfg.sparsity_warmup_steps:
            self.log_coef += cfg.target_l0_rate * math.log(max(l0, 1e-3) / cfg.target_l0)
            if cfg.threshold_control_rate and self.log_threshold is not None:
                with torch.no_grad():
                    self.log_threshold += cfg.threshold_control_rate * math.log(max(l0, 1e-3) / cfg.target_l0)
            self.log_coef = min(max(self.log_coef, -_MAX_LOG_COEF), _MAX_LOG_COEF)

    # ---- checkpoints

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def check_config(self, saved: Any, path: Path) -> None:
        try:
            saved_cfg = TrainConfig.from_dict(saved)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable training config ({e}); a crosscoder checkpoint resumes with "
                                  "train_crosscoder, an SAE checkpoint with train_sae") from e
        diff = saved_cfg.differences(self.cfg)
        if diff:
            was, now = saved_cfg.to_dict(), self.cfg.to_dict()
            raise CheckpointError(f"{path}: cannot resume with a different config: "
                                  + ", ".join(f"{k} was {was[k]!r}, now {now[k]!r}" for k in diff))

    def module_tensors(self) -> dict[str, torch.Tensor]:
        if self.log_threshold is not None:
            with torch.no_grad():
                self.sae.threshold.copy_(self.log_threshold.exp())
        t = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        if self.log_threshold is not None:
            t["train.log_threshold"] = self.log_threshold.detach()
        if self.probe is not None:
            t.update(self.probe.tensors())
        return t

    def module_state(self) -> dict[str, Any]:
        return {"scale": self.scale, "log_coef": self.log_coef, **(self.probe.state() if self.probe else {})}

    def restore_module(self, t: dict[str, torch.Tensor], s: dict[str, Any]) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")}, strict=True)
        if self.log_threshold is not None:
            self.log_threshold.data.copy_(t["train.log_threshold"])
        if self.probe is not None:
            self.probe.restore(t, s)
        self.scale, self.log_coef = float(s["scale"]), float(s["log_coef"])

    def final_module(self) -> SAE:
        """The SAE for raw activations: codes and b's divided by the scale, so decoder rows keep their norms."""
        s = self.scale
        sd = {k: v.detach().clone() for k, v in self.sae.state_dict().items()}
        if self.log_threshold is not None:
            sd["threshold"] = self.log_threshold.detach().exp()
        sd["b_enc"], sd["b_dec"] = sd["b_enc"] / s, sd["b_dec"] / s
        if "probe_weight" in sd:  # the probe read s·x in training; it reads raw x now
            sd["probe_weight"] = sd["probe_weight"] * s
        if "threshold" in sd and (self.log_threshold is not None or float(sd["threshold"]) >= 0):
            sd["threshold"] = sd["threshold"] / s
        return SAE.from_state_dict(self.cfg.sae, sd, source="trained SAE")

    def scale_value(self) -> float:
        return self.scale


def train_sae(cfg: TrainConfig, source: Source, *, out_dir: str | os.PathLike | None = None, resume: bool = False,
              progress: bool = True, callback: Callable[[int, dict[str, float]], None] | None = None,
              complexity: ComplexityData | None = None) -> TrainResult:
    """Train an SAE as `cfg` says on batches from `source`; checkpoints and the final SAE go to `out_dir`.

    `resume=True` continues from the newest complete checkpoint in out_dir (or starts fresh if there is none);
    without it, an out_dir that already holds checkpoints is refused. A fresh run seeds python, numpy and torch
    with cfg.seed. `callback(step, metrics)` runs after every optimizer step (and after its checkpoint).
    'adaptivek' needs `complexity` (toolkit.training.complexity): its probe is fitted on it, then trained on it in
    the joint phase; a resumed run must be given the same examples.
    """
    run = SAERun(cfg, complexity)  # checks the arguments before the data is opened
    stream = sae_stream(source, cfg.sae.d_in, cfg.batch_size, cfg.seed, cfg.sae.site)
    return fit(run, stream, out_dir=out_dir, resume=resume, progress=progress, callback=callback,
               desc=f"train {cfg.sae.architecture}")
