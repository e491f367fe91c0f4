"""AdaptiveK's probe in training (held by sae_trainer.SAERun): fitted in closed form before the first step, frozen
while the SAE trains, then trained jointly in the last `joint_fraction` of the steps (the reference's phases 1-3).

Joint phase, per step: probe loss = MSE(probe(x_c), s_c) + (λ / n) ||w||² (the closed-form ridge objective per
example, so the fitted probe is its minimum) + ρ (||w - w₀|| + |b - b₀|) on a seeded minibatch of the complexity
examples, weighted by probe_loss_weight. ρ adapts as in the reference: × 0.8 while the probe loss falls by more
than 5 % over three steps, else × 1.2, within [0.01, 0.5]. Its state is saved, so a resumed run continues exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from toolkit.config import TrainConfig
from toolkit.errors import ArgumentError, CheckpointError
from toolkit.sae.sae import SAE
from toolkit.training.complexity import ComplexityData, fit_probe

_RHO = (0.2, 0.01, 0.5, 0.05)  # the reference's initial deviation weight, its bounds, and the stability threshold


class ProbePhase:
    """The probe's training state: its fitted start (w₀, b₀), the ridge λ, and the adaptive deviation weight ρ."""

    def __init__(self, cfg: TrainConfig, sae: SAE, data: ComplexityData | None) -> None:
        if not isinstance(data, ComplexityData):
            raise ArgumentError("an 'adaptivek' SAE needs complexity=ComplexityData(activations, scores) to fit its "
                                "probe (see toolkit.training.complexity.complexity_examples)")
        if data.activations.shape[1] != cfg.sae.d_in:
            raise ArgumentError(f"the complexity examples are {data.activations.shape[1]} wide, but the SAE reads "
                                f"{cfg.sae.d_in}-wide activations")
        self.cfg, self.sae, self.data = cfg, sae, data
        self.w0 = torch.zeros_like(sae.probe_weight)
        self.b0 = torch.zeros_like(sae.probe_bias)
        self.penalty, self.cv_rmse, self.rho, self.losses, self.last = 0.0, 0.0, _RHO[0], [], 0.0
        self.joint_from = cfg.n_steps - round(cfg.joint_fraction * cfg.n_steps)

    def params(self) -> list[torch.nn.Parameter]:
        return [self.sae.probe_weight, self.sae.probe_bias]

    def fit(self, scale: float) -> None:
        """Phase 1: ridge on the normalized activations (the SAE's training units)."""
        fit = fit_probe(self.data, self.cfg.probe_lambdas, folds=self.cfg.probe_folds, seed=self.cfg.seed,
                        scale=scale)
        with torch.no_grad():
            self.sae.probe_weight.copy_(fit.weight)
            self.sae.probe_bias.fill_(fit.bias)
        self.w0, self.b0 = self.sae.probe_weight.detach().clone(), self.sae.probe_bias.detach().clone()
        self.penalty, self.cv_rmse = fit.penalty, fit.cv_rmse

    def joint(self, step: int) -> bool:
        return step >= self.joint_from

    def term(self, step: int, scale: float) -> torch.Tensor:
        """The weighted probe loss of optimizer step `step` (joint phase), on its own seeded minibatch."""
        n = len(self.data)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        pick = torch.randint(n, (min(n, self.cfg.batch_size),), generator=gen)
        x = self.data.activations[pick].to(self.sae.probe_weight) * scale
        y = self.data.scores[pick].to(x)
        w, b = self.sae.probe_weight, self.sae.probe_bias
        mse = ((x @ w + b).clamp(0, 1) - y).pow(2).mean()
        probe_loss = mse + self.penalty / n * w.pow(2).sum()
        self.last = float(probe_loss.detach())
        deviation = (w - self.w0).norm() + (b - self.b0).abs()
        return self.cfg.probe_loss_weight * (probe_loss + self.rho * deviation)

    def after_update(self) -> None:
        """Adapt ρ from the last three probe losses (the reference's _update_deviation_weight)."""
        self.losses.append(self.last)
        recent = self.losses[-3:]
        if len(recent) == 3 and recent[0] > 0:
            stable = (recent[0] - recent[-1]) / recent[0] <= _RHO[3]
            self.rho = min(_RHO[2], self.rho * 1.2) if stable else max(_RHO[1], self.rho * 0.8)
        self.losses = recent

    # ---- checkpoints

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"train.probe_w0": self.w0, "train.probe_b0": self.b0}

    def state(self) -> dict[str, Any]:
        return {"probe": {"penalty": self.penalty, "cv_rmse": self.cv_rmse, "rho": self.rho, "losses": self.losses,
                          "data": self.data.fingerprint}}

    def restore(self, t: dict[str, torch.Tensor], s: dict[str, Any], path: Path | None = None) -> None:
        p = s["probe"]
        if p["data"] != self.data.fingerprint:
            raise CheckpointError(f"{path or 'checkpoint'}: this run was trained with other complexity examples; "
                                  "resume with the same ComplexityData")
        self.w0, self.b0 = t["train.probe_w0"].to(self.w0), t["train.probe_b0"].to(self.b0)
        self.penalty, self.cv_rmse, self.rho = float(p["penalty"]), float(p["cv_rmse"]), float(p["rho"])
        self.losses = [float(v) for v in p["losses"]]
