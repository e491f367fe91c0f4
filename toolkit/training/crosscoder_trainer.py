"""Crosscoder training: `train_crosscoder(cfg, source, training, out_dir=..., resume=...)`, on the shared loop of
toolkit.training.trainer (the same schedule, clipping, NaN guard, AuxK, dead-latent counting, checkpoints and
history as SAEs).

Objectives (toolkit.training.objectives.crosscoder_objective; squared error summed over both models):
- 'batchtopk' ("Overcoming Sparsity Artifacts in Crosscoders"): the k * n_tokens largest weighted codes of the
  batch, plus AuxK on dead latents; the inference threshold is estimated as for BatchTopK SAEs.
- 'relu' (Anthropic's crosscoder): ReLU codes + l1_coefficient * sum_j f_j (|d_j^base| + |d_j^ft|), ramped up
  over sparsity_warmup_steps.
Normalization, as for SAEs: each model's activations are scaled by one scalar so that E||s_m x_m|| = sqrt(d_in);
the crosscoder keeps the scalars as `input_scale`, so it reads raw activations.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toolkit.config import CrosscoderConfig, CrosscoderTraining
from toolkit.crosscoder import Crosscoder
from toolkit.crosscoder.crosscoder import source_rows
from toolkit.errors import CheckpointError, NonFiniteError
from toolkit.io import load_weight_folder
from toolkit.training.batches import BatchStream, PairedSource, iter_paired, paired_stream
from toolkit.training.objectives import LossContext, LossOutput, crosscoder_objective
from toolkit.training.trainer import Run, TrainResult, fit

CROSSCODER_DIR = "crosscoder"
LEGACY_PREFIX = "step-"
"""Checkpoint folders of the trainer before the shared loop (`<checkpoint_dir>/step-XXXXXXXX/`)."""

__all__ = ["CROSSCODER_DIR", "CrosscoderRun", "iter_paired", "load_legacy_checkpoint", "train_crosscoder"]


class CrosscoderRun(Run):
    """Training state of one crosscoder (see Run for what is shared)."""

    name = CROSSCODER_DIR

    def __init__(self, cfg: CrosscoderConfig, training: CrosscoderTraining) -> None:
        super().__init__(training, cfg.d_sae, training.aux_k or cfg.d_in // 2)
        self.cc_cfg = cfg
        with torch.device(training.device):
            self.cc = Crosscoder(cfg, seed=training.seed).train()
        self.setup_optimizer([{"params": list(self.cc.parameters()), "lr_scale": 1.0}])

    @torch.no_grad()
    def initialize(self, stream: BatchStream) -> None:
        batches = stream.peek(self.cfg.normalize_batches)
        xs = torch.cat(batches).to(self.cc.device, self.cc.dtype) if batches else torch.empty(0, 2, self.cc.d_in)
        xs = xs[torch.isfinite(xs).all(dim=-1).all(dim=-1)]  # non-finite rows are skipped in training; here too
        if not len(xs):
            raise NonFiniteError(f"none of the first {len(batches)} batches has a finite row: cannot estimate the "
                                 "normalization scale or initialize b_dec")
        if self.cfg.normalize:
            norms = xs.to(torch.float64).norm(dim=-1).mean(0).clamp_min(1e-12)  # (2,): E||x_m|| per model
            self.cc.input_scale.copy_((math.sqrt(self.cc.d_in) / norms).to(self.cc.dtype))
        self.cc.b_dec.copy_((xs * self.cc.input_scale[:, None]).mean(0))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.cc.dtype) * self.cc.input_scale[:, None]

    def coefficient(self) -> float:
        return self.cfg.l1_coefficient * self.sparsity_warmup() if self.cc_cfg.architecture == "relu" else 0.0

    def loss_context(self, dead: torch.Tensor) -> LossContext:
        return LossContext(self.coefficient(), None, 0.0, dead, self.aux_k, self.cfg.aux_k_coefficient)

    def objective(self, x: torch.Tensor, ctx: LossContext) -> LossOutput:
        return crosscoder_objective(self.cc, x, ctx)

    def threshold(self) -> torch.Tensor | None:
        return self.cc.threshold if self.cc_cfg.architecture == "batchtopk" else None

    # ---- checkpoints

    def config_dict(self) -> dict[str, Any]:
        return {"crosscoder": self.cc_cfg.to_dict(), "training": self.cfg.to_dict()}

    def check_config(self, saved: Any, path: Path) -> None:
        try:
            cc_cfg = CrosscoderConfig.from_dict(saved["crosscoder"])
            training = CrosscoderTraining.from_dict(saved["training"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a crosscoder training checkpoint ({e}); an SAE checkpoint resumes "
                                  "with train_sae") from e
        diff = training.differences(self.cfg) + (["crosscoder config"] if cc_cfg != self.cc_cfg else [])
        if diff:
            raise CheckpointError(f"{path}: cannot resume with different settings ({', '.join(diff)} differ); "
                                  "use the same CrosscoderConfig and CrosscoderTraining, or another out_dir")

    def module_tensors(self) -> dict[str, torch.Tensor]:
        return {f"crosscoder.{k}": v for k, v in self.cc.state_dict().items()}

    def restore_module(self, t: dict[str, torch.Tensor], s: dict[str, Any]) -> None:
        self.cc.load_state_dict({k[len("crosscoder."):]: v for k, v in t.items() if k.startswith("crosscoder.")},
                                strict=True)

    def final_module(self) -> Crosscoder:
        cc = Crosscoder.from_state_dict(self.cc_cfg, {k: v.detach().clone() for k, v in self.cc.state_dict().items()},
                                        source="trained crosscoder")
        return cc.eval()

    def scale_value(self) -> list[float]:
        return self.cc.input_scale.tolist()


def _refuse_legacy(out: Path | None) -> None:
    old = sorted(out.glob(f"{LEGACY_PREFIX}*")) if out is not None and out.is_dir() else []
    if old:
        raise CheckpointError(
            f"{out} holds checkpoints of the older crosscoder trainer ({old[-1].name}, another layout and "
            "normalization); they cannot be resumed. To keep the weights: "
            f"toolkit.training.crosscoder_trainer.load_legacy_checkpoint({str(old[-1])!r}) returns the Crosscoder "
            "(save it with .save(folder)); to train on, delete those folders or choose another out_dir")


def load_legacy_checkpoint(folder: str | os.PathLike) -> Crosscoder:
    """The crosscoder of a checkpoint folder written by the older trainer (`step-XXXXXXXX/`), in eval mode."""
    tensors, meta = load_weight_folder(folder)
    try:
        cfg = CrosscoderConfig.from_dict(meta["crosscoder"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: not a crosscoder checkpoint of the older trainer ({e})") from e
    state = {k[3:]: v for k, v in tensors.items() if k.startswith("cc.")}
    return Crosscoder.from_state_dict(cfg, state, source=str(folder))


def train_crosscoder(cfg: CrosscoderConfig, source: PairedSource, training: CrosscoderTraining | None = None, *,
                     out_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
                     callback: Callable[[int, dict[str, float]], None] | None = None,
                     **overrides: Any) -> TrainResult:
    """Train a crosscoder on `source` (checked against cfg.models / cfg.site / cfg.d_in first).

    `overrides` replace fields of `training` (e.g. total_steps=500). Checkpoints go to out_dir/checkpoints and the
    final crosscoder to out_dir/crosscoder; `resume=True` continues from the newest complete checkpoint.
    """
    training = dataclasses.replace(training or CrosscoderTraining(), **overrides)
    run = CrosscoderRun(cfg, training)
    source_rows(run.cc, source)
    out = Path(out_dir) if out_dir is not None else None
    _refuse_legacy(out)
    site = cfg.site if isinstance(source, tuple) else None
    stream = paired_stream(source, cfg.d_in, training.batch_size, training.seed, site)
    return fit(run, stream, out_dir=out, resume=resume, progress=progress, callback=callback,
               desc=f"crosscoder ({cfg.architecture})")
