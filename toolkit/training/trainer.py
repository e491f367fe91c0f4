"""The one training loop for SAEs and crosscoders: `fit(run, stream, ...)`.

A `Run` holds all mutable training state. This module owns what every trainer shares: the learning-rate schedule
(`lr_at`), the NaN guard (a non-finite batch, loss or gradient skips the step and changes nothing; too many in a
row raise NonFiniteError), global gradient-norm clipping, dead-latent counting in tokens, the BatchTopK inference
threshold, metrics history, the progress bar, and complete atomic checkpoints (toolkit.training.checkpoint) with
python/numpy/torch RNG states, so that a resumed run continues bit for bit. Subclasses (sae_trainer.SAERun,
crosscoder_trainer.CrosscoderRun) add the module, its initialization from the first batches, its objective and
what it saves.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.config import Optimization
from toolkit.errors import CheckpointError, NonFiniteError
from toolkit.folders import lock_folder, make_dir
from toolkit.progress import progress_bar
from toolkit.training import distributed, restart
from toolkit.training.batches import BatchStream
from toolkit.training.checkpoint import Checkpoint
from toolkit.training.objectives import LossContext, LossOutput

log = logging.getLogger(__name__)

_WINDOW = ("loss", "mse", "fvu", "l0", "aux", "sparsity")
_COUNTERS = ("position", "tokens", "skipped", "consecutive", "thr_count")


@dataclass(frozen=True)
class TrainResult:
    """What train_sae and train_crosscoder return."""

    module: Any
    """The trained SAE or Crosscoder in eval mode; it reads raw activations (normalization folded in or kept)."""
    history: list[dict[str, float]]
    """Metrics averaged over each `log_every` steps: step, tokens, lr, coefficient, loss, mse, fvu, l0, aux,
    sparsity, dead_fraction, skipped_steps (and threshold for BatchTopK-style architectures)."""
    steps: int
    """Optimizer steps done in total (including those before a resume)."""
    tokens: int
    """Tokens trained on in total."""
    skipped_steps: int
    """Batches skipped because the batch, the loss or a gradient was non-finite."""
    scale: float | list[float]
    """Normalization scalar the activations were multiplied by (one per model for crosscoders; 1.0 without)."""
    saved_dir: Path | None
    """Where the final module was saved (out_dir/sae or out_dir/crosscoder), if out_dir was given."""
    seconds: float
    """Wall time of this call."""
    tokens_per_s: float
    """Training tokens per second in this call (initialization and checkpoints included)."""

    @property
    def sae(self) -> Any:
        """The trained module (an SAE, for results of train_sae)."""
        return self.module

    @property
    def crosscoder(self) -> Any:
        """The trained module (a Crosscoder, for results of train_crosscoder)."""
        return self.module


def lr_at(cfg: Optimization, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, constant, then linear/cosine decay."""
    n, f = cfg.n_steps, 1.0
    if step < cfg.warmup_steps:
        f = (step + 1) / cfg.warmup_steps
    start = max(cfg.warmup_steps, int(cfg.decay_start * n))
    if cfg.decay != "none" and step >= start:
        t = (step - start) / max(n - start, 1)
        shape = 1 - t if cfg.decay == "linear" else 0.5 * (1 + math.cos(math.pi * t))
        f *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return cfg.lr * f


class Run:
    """Training state shared by every trainer; `tensors()`/`state()` snapshot it and `restore()` brings it back.

    Subclasses set `module`, call `setup_optimizer`, and implement the hooks below the divider."""

    name = "module"
    """Folder of the final module inside out_dir."""

    def __init__(self, cfg: Optimization, d_sae: int, aux_k: int) -> None:
        self.cfg, self.aux_k = cfg, aux_k
        self.step = self.position = self.tokens = self.skipped = self.consecutive = self.thr_count = 0
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=cfg.device)
        self.history: list[dict[str, float]] = []
        self.window = dict.fromkeys(("n", *_WINDOW), 0.0)

    def setup_optimizer(self, groups: list[dict[str, Any]]) -> None:
        """Adam over parameter groups, each with an `lr_scale` multiplying the scheduled learning rate."""
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.Adam(groups, lr=self.cfg.lr, betas=self.cfg.adam_betas, eps=self.cfg.adam_eps)

    # ---- one step

    def sparsity_warmup(self) -> float:
        """The factor (0, 1] ramping the sparsity coefficient up over sparsity_warmup_steps."""
        warm = self.cfg.sparsity_warmup_steps
        return min(1.0, (self.step + 1) / warm) if warm else 1.0

    def train_step(self, x: torch.Tensor) -> LossOutput | None:
        """One optimizer step on the normalized batch x; None (nothing changed) if the loss or a gradient is non-finite."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step) * group["lr_scale"]
        dead = self.since_fired >= cfg.dead_after_tokens
        out = self.objective(x, self.loss_context(dead))
        self.opt.zero_grad(set_to_none=True)
        if not distributed.agree(bool(torch.isfinite(out.loss))):
            return None
        out.loss.backward()
        distributed.average_gradients(self.params)  # data parallel: every rank takes the same step
        with_grad = [p for p in self.params if p.grad is not None]
        self.constrain_gradients()
        # one norm over all gradients: non-finite iff a gradient is (then nothing changes), and what clipping needs
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        if not bool(torch.isfinite(norm)):
            self.opt.zero_grad(set_to_none=True)
            return None
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(with_grad, cfg.max_grad_norm, norm)
        self.opt.step()
        self.after_update()
        return out

    def after_step(self, x: torch.Tensor, out: LossOutput) -> dict[str, float]:
        """Counters, dead latents, the threshold and the history after a successful step; returns its metrics."""
        n = x.shape[0] * distributed.world_size()
        self.step, self.tokens, self.consecutive = self.step + 1, self.tokens + n, 0
        self.since_fired += n
        out = distributed.reduce_batch_stats(out)
        self.since_fired[out.fired] = 0
        threshold = self.threshold()
        if out.min_selected is not None and threshold is not None:  # BatchTopK inference threshold: mean, then EMA
            self.thr_count += 1
            w = max(1 / self.thr_count, 1 - self.cfg.threshold_ema_beta)
            with torch.no_grad():
                threshold.copy_(out.min_selected if self.thr_count == 1 else threshold + w * (out.min_selected - threshold))
        stats = distributed.all_reduce(torch.stack([out.loss.detach(), out.mse, out.l0, out.aux, out.sparsity]), "mean")
        loss, mse, l0, aux, sparsity, var = [*stats.tolist(), float(distributed.global_centered_sq(x))]
        self.observe_l0(l0)
        m = {"loss": loss, "mse": mse, "fvu": mse * n / var if var > 0 else math.nan, "l0": l0, "aux": aux,
             "sparsity": sparsity}
        self.window["n"] += 1
        for k in _WINDOW:
            self.window[k] += m[k]
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.n_steps:
            self._log_window(threshold)
        return m

    def _log_window(self, threshold: torch.Tensor | None) -> None:
        entry = {"step": self.step, "tokens": self.tokens, "lr": lr_at(self.cfg, self.step - 1),
                 "coefficient": self.coefficient(), **{k: self.window[k] / self.window["n"] for k in _WINDOW},
                 "dead_fraction": self.dead_fraction(), "skipped_steps": self.skipped}
        if threshold is not None:
            entry["threshold"] = float(threshold)
        self.history.append(entry)
        self.window = dict.fromkeys(("n", *_WINDOW), 0.0)

    def dead_fraction(self) -> float:
        return float((self.since_fired >= self.cfg.dead_after_tokens).float().mean())

    # ---- checkpoints

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state: the module's, Adam's, the dead-latent counters and the RNG states."""
        t = self.module_tensors()
        for i, st in self.opt.state_dict()["state"].items():
            t.update({f"optim.{i}.{k}": v for k, v in st.items()})
        t["train.since_fired"] = self.since_fired
        t["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            t.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        t["rng.numpy"] = torch.from_numpy(np.random.get_state()[1].astype(np.int64))
        return {k: v.detach().cpu().clone() for k, v in t.items()}

    def state(self) -> dict[str, Any]:
        """The JSON part of the state: config, counters, history and the python/numpy RNG positions."""
        py = random.getstate()
        _, _, npos, has_gauss, gauss = np.random.get_state()
        return {"config": self.config_dict(), **{k: getattr(self, k) for k in _COUNTERS}, **self.module_state(),
                "history": self.history, "window": self.window, "rng_python": [py[0], list(py[1]), py[2]],
                "rng_numpy": [int(npos), int(has_gauss), float(gauss)]}

    def restore(self, ck: Checkpoint) -> None:
        """Bring back the exact state of checkpoint `ck` (CheckpointError if it was made with other settings)."""
        self.check_config(ck.state.get("config"), ck.path)
        t, s = ck.tensors, ck.state
        try:
            self.restore_module(t, s)
            opt = self.opt.state_dict()
            opt["state"] = {}
            for k, v in t.items():
                if k.startswith("optim."):
                    _, i, name = k.split(".", 2)
                    opt["state"].setdefault(int(i), {})[name] = v
            self.opt.load_state_dict(opt)
            self.since_fired = t["train.since_fired"].to(self.cfg.device)
            self.step = int(s["step"])
            for k in _COUNTERS:
                setattr(self, k, int(s[k]))
            self.history, self.window = list(s["history"]), dict(s["window"])
            restart.restore_rng(t, s)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ck.path}: incomplete or inconsistent training state ({e})") from e

    # ---- hooks (subclasses)

    def initialize(self, stream: BatchStream) -> None:
        """Set normalization and initial parameters from the first batches (peeked, then trained on as usual)."""
        raise NotImplementedError

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The raw batch x in the units the module trains in."""
        raise NotImplementedError

    def coefficient(self) -> float:
        """The sparsity coefficient of the current step (0 where the architecture has none)."""
        raise NotImplementedError

    def loss_context(self, dead: torch.Tensor) -> LossContext:
        raise NotImplementedError

    def objective(self, x: torch.Tensor, ctx: LossContext) -> LossOutput:
        raise NotImplementedError

    def constrain_gradients(self) -> None:
        """Edit gradients before clipping (e.g. drop the radial part for unit-norm decoder rows)."""

    def after_update(self) -> None:
        """Project parameters after Adam's step (e.g. renormalize decoder rows)."""

    def threshold(self) -> torch.Tensor | None:
        """The BatchTopK inference-threshold buffer to estimate, if the architecture has one."""
        return None

    def observe_l0(self, l0: float) -> None:
        """React to the batch L0 (e.g. a target-L0 controller)."""

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def check_config(self, saved: Any, path: Path) -> None:
        raise NotImplementedError

    def module_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def module_state(self) -> dict[str, Any]:
        return {}

    def restore_module(self, t: dict[str, torch.Tensor], s: dict[str, Any]) -> None:
        raise NotImplementedError

    def final_module(self) -> Any:
        """The trained module for raw activations, in eval mode."""
        raise NotImplementedError

    def scale_value(self) -> float | list[float]:
        raise NotImplementedError


def _one_batch(run: Run, stream: BatchStream) -> tuple[torch.Tensor, LossOutput | None] | None:
    """Pull a batch and train on it; None when the source ran out, (x, None) when the step was skipped."""
    x = stream.next()
    if x is None:
        warnings.warn(f"the source ran out after {stream.position} batches, at step {run.step} of "
                      f"{run.cfg.n_steps}; stopping early", stacklevel=4)
        return None
    run.position = stream.position
    x = run.normalize(x.to(device=run.cfg.device))
    result = run.train_step(x) if distributed.agree(bool(torch.isfinite(x).all())) else None
    if result is None:
        run.skipped += 1
        run.consecutive += 1
        if run.consecutive >= run.cfg.max_consecutive_skips:
            raise NonFiniteError(f"{run.consecutive} consecutive steps skipped (non-finite activations, "
                                 f"loss or gradients) at step {run.step}; {run.skipped} skipped in all")
    return x, result


def fit(run: Run, stream: BatchStream, *, out_dir: str | os.PathLike | None = None, resume: bool = False,
        progress: bool = True, callback: Callable[[int, dict[str, float]], None] | None = None,
        desc: str = "train") -> TrainResult:
    """Train `run` on `stream` to cfg.n_steps; checkpoints go to out_dir/checkpoints, the module to out_dir/<name>.

    `resume=True` continues from the newest complete checkpoint in out_dir (or starts fresh if there is none);
    without it, an out_dir that already holds checkpoints is refused. A fresh run seeds python, numpy and torch
    with cfg.seed. `callback(step, metrics)` runs after every optimizer step (and after its checkpoint).
    Under torchrun (WORLD_SIZE > 1) it trains data parallel (toolkit.training.distributed): cfg.batch_size is the
    global batch; rank 0 writes the checkpoints and the module and shows progress.
    """
    t0 = time.perf_counter()
    if distributed.init_from_env():
        stream = distributed.ShardedStream(stream)
    main = distributed.is_main()
    out = make_dir(out_dir, "training output folder") if out_dir is not None else None
    lock = lock_folder(out, "training output folder") if out is not None and main else None  # held until fit returns
    try:
        return _fit(run, stream, out, resume, progress and main, callback, desc, t0)
    finally:
        if lock is not None:
            lock.release()


def _fit(run: Run, stream: BatchStream, out: Path | None, resume: bool, progress: bool,
         callback: Callable[[int, dict[str, float]], None] | None, desc: str, t0: float) -> TrainResult:
    cfg = run.cfg
    resumed = restart.start(run, out, resume)
    stream.seek(run.position)
    if not resumed and run.step < cfg.n_steps:
        run.initialize(stream)
    start_step, start_tokens = run.step, run.tokens
    bar = progress_bar(total=cfg.n_steps, initial=run.step, enabled=progress, desc=desc, unit="step",
                       dynamic_ncols=True)
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # notebooks often turn gradients off globally; training needs them
    try:
        while run.step < cfg.n_steps:
            got = _one_batch(run, stream)
            if got is None:
                break
            x, result = got
            if result is None:
                continue
            metrics = run.after_step(x, result)
            bar.update(1)
            if run.step % 10 == 0 or run.step == cfg.n_steps:
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", L0=f"{metrics['l0']:.1f}",
                                FVU=f"{metrics['fvu']:.3f}", dead=f"{run.dead_fraction():.1%}", refresh=False)
            if out is not None and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 \
                    and run.step < cfg.n_steps:
                restart.save(run, out)
            if callback is not None:
                callback(run.step, metrics)
    finally:
        torch.set_grad_enabled(grad_mode)
        bar.close()
    module = run.final_module()
    saved = None
    if out is not None:
        saved = restart.save(run, out, module)
    seconds = time.perf_counter() - t0
    return TrainResult(module=module, history=list(run.history), steps=run.step, tokens=run.tokens,
                       skipped_steps=run.skipped, scale=run.scale_value(), saved_dir=saved, seconds=seconds,
                       tokens_per_s=(run.tokens - start_tokens) / seconds if run.step > start_step else 0.0)
