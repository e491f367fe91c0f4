"""SAE trainer for every architecture: `train_sae(cfg, source, out_dir=..., resume=...)`.

One step: a batch of activations (skipped and counted if non-finite), scaled by the normalization scalar, goes
through the architecture's objective (toolkit.sae.losses); Adam steps unless the loss or a gradient is
non-finite (then the step is skipped and counted, weights and optimizer untouched); the global gradient norm is
clipped to TrainConfig.max_grad_norm first. Decoder rows stay at unit
norm where the architecture's paper does so (TrainConfig.decoder_unit_norm). Complete checkpoints
(toolkit.sae.checkpoint) hold everything a resumed run needs to continue bit-for-bit: weights, Adam state,
step, data position, dead-latent counters, normalization scale, controller and threshold statistics,
python/numpy/torch RNG states, metrics history and the config.

Normalization: one scalar s with E||s·x|| = sqrt(d_in) on the first `normalize_batches` batches; on save it is
folded into the SAE (b_enc, b_dec and thresholds divided by s, so codes come out in raw units and decoder rows
keep unit norm). Target L0 (jumprelu/relu): after the sparsity warmup, log λ += target_l0_rate · log(L0/target)
every step (integral control on the batch L0, clamped to e^±10 around the configured λ).
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
from torch import nn

from toolkit.config import TrainConfig
from toolkit.errors import CheckpointError, NonFiniteError
from toolkit.progress import progress_bar
from toolkit.sae.checkpoint import Checkpoint, list_checkpoints, load_latest_checkpoint, save_checkpoint
from toolkit.sae.losses import LossContext, LossOutput, get_objective
from toolkit.sae.sae import JUMPRELU_INIT_THRESHOLD, SAE
from toolkit.sae.train_source import BatchStream, Source

log = logging.getLogger(__name__)

SAE_DIR = "sae"
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
_WINDOW = ("loss", "mse", "fvu", "l0", "aux", "sparsity")
_MAX_LOG_COEF = 10.0  # the target-L0 controller keeps λ within e^±10 of its configured value (no wind-up)


@dataclass(frozen=True)
class TrainResult:
    """What train_sae returns."""

    sae: SAE
    """The trained SAE in eval mode, normalization folded in: it reads raw activations."""
    history: list[dict[str, float]]
    """Metrics averaged over each `log_every` steps: step, tokens, lr, coefficient, loss, mse, fvu, l0, aux,
    sparsity, dead_fraction, skipped_steps (and threshold for batchtopk/matryoshka)."""
    steps: int
    """Optimizer steps done in total (including those before a resume)."""
    tokens: int
    """Tokens trained on in total."""
    skipped_steps: int
    """Batches skipped because the batch, the loss or a gradient was non-finite."""
    scale: float
    """Normalization scalar the activations were multiplied by during training (1.0 without normalization)."""
    sae_dir: Path | None
    """Where the final SAE was saved (out_dir/sae), if out_dir was given."""
    seconds: float
    """Wall time of this call."""
    tokens_per_s: float
    """Training tokens per second in this call (initialization and checkpoints included)."""


# ---------------------------------------------------------------- schedules and initialization


def lr_at(cfg: TrainConfig, step: int) -> float:
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


class _Run:
    """All mutable training state; `tensors()`/`state()` snapshot it and `restore()` brings it back exactly."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.arch = cfg.sae.architecture
        self.objective = get_objective(self.arch)
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
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
        self.step = self.position = self.tokens = self.skipped = self.consecutive = self.thr_count = 0
        self.scale, self.log_coef = 1.0, 0.0
        self.since_fired = torch.zeros(cfg.sae.d_sae, dtype=torch.int64, device=cfg.device)
        self.history: list[dict[str, float]] = []
        self.window = dict.fromkeys(("n", *_WINDOW), 0.0)

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
            with torch.no_grad():  # each latent fires on target_l0 / d_sae of the first batch's tokens
                x = batches[0].to(self.sae.b_dec) * self.scale
                pre = torch.addmm(self.sae.b_enc, x - self.sae.b_dec if cfg.sae.apply_b_dec_to_input else x,
                                  self.sae.W_enc)
                above = max(1, round(pre.shape[0] * cfg.target_l0 / cfg.sae.d_sae))
                theta = pre.kthvalue(max(pre.shape[0] - above, 1), dim=0).values  # `above` tokens exceed it
                self.log_threshold.copy_(theta.clamp_min(JUMPRELU_INIT_THRESHOLD).log())

    # ---- one step

    def coefficient(self) -> float:
        base = {"relu": self.cfg.l1_coefficient, "jumprelu": self.cfg.l0_coefficient}.get(self.arch, 0.0)
        warm = self.cfg.sparsity_warmup_steps
        return base * (min(1.0, (self.step + 1) / warm) if warm else 1.0) * math.exp(self.log_coef)

    def train_step(self, x: torch.Tensor) -> LossOutput | None:
        """One optimizer step on the normalized batch x; None (nothing changed) if the loss or a gradient is non-finite."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step) * group["lr_scale"]
        dead = self.since_fired >= cfg.dead_after_tokens
        ctx = LossContext(self.coefficient(), self.log_threshold, cfg.jumprelu_bandwidth, dead,
                          cfg.aux_k or cfg.sae.d_in // 2, cfg.aux_k_coefficient)
        out = self.objective(self.sae, x, ctx)
        self.opt.zero_grad(set_to_none=True)
        if not bool(torch.isfinite(out.loss)):
            return None
        out.loss.backward()
        with_grad = [p for p in self.params if p.grad is not None]
        W = self.sae.W_dec
        if cfg.decoder_unit_norm and W.grad is not None:  # keep ||W_dec[i]|| = 1: drop the radial gradient
            W.grad -= (W.grad * W.detach()).sum(1, keepdim=True) * W.detach()
        # one norm over all gradients: non-finite iff a gradient is (then nothing changes), and what clipping needs
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        if not bool(torch.isfinite(norm)):
            self.opt.zero_grad(set_to_none=True)
            return None
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(with_grad, cfg.max_grad_norm, norm)
        self.opt.step()
        if cfg.decoder_unit_norm:
            with torch.no_grad():
                W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return out

    def after_step(self, x: torch.Tensor, out: LossOutput) -> dict[str, float]:
        cfg, n = self.cfg, x.shape[0]
        self.step, self.tokens, self.consecutive = self.step + 1, self.tokens + n, 0
        self.since_fired += n
        self.since_fired[out.fired] = 0
        if out.min_selected is not None:  # BatchTopK inference threshold: running mean, then EMA
            self.thr_count += 1
            w = max(1 / self.thr_count, 1 - cfg.threshold_ema_beta)
            with torch.no_grad():
                t = self.sae.threshold
                t.copy_(out.min_selected if self.thr_count == 1 else t + w * (out.min_selected - t))
        total_var = (x - x.mean(0)).pow(2).sum()
        loss, mse, l0, aux, sparsity, var = torch.stack(
            [out.loss.detach(), out.mse, out.l0, out.aux, out.sparsity, total_var]).tolist()
        if cfg.target_l0 is not None and self.step > cfg.sparsity_warmup_steps:
            self.log_coef += cfg.target_l0_rate * math.log(max(l0, 1e-3) / cfg.target_l0)
            if cfg.threshold_control_rate and self.log_threshold is not None:
                with torch.no_grad():
                    self.log_threshold += cfg.threshold_control_rate * math.log(max(l0, 1e-3) / cfg.target_l0)
            self.log_coef = min(max(self.log_coef, -_MAX_LOG_COEF), _MAX_LOG_COEF)
        m = {"loss": loss, "mse": mse, "fvu": mse * n / var if var > 0 else math.nan, "l0": l0, "aux": aux,
             "sparsity": sparsity}
        self.window["n"] += 1
        for k in _WINDOW:
            self.window[k] += m[k]
        if self.step % cfg.log_every == 0 or self.step == cfg.n_steps:
            entry = {"step": self.step, "tokens": self.tokens, "lr": lr_at(cfg, self.step - 1),
                     "coefficient": self.coefficient(),
                     **{k: self.window[k] / self.window["n"] for k in _WINDOW},
                     "dead_fraction": self.dead_fraction(), "skipped_steps": self.skipped}
            if self.sae.cfg.architecture in ("batchtopk", "matryoshka"):
                entry["threshold"] = float(self.sae.threshold)
            self.history.append(entry)
            self.window = dict.fromkeys(("n", *_WINDOW), 0.0)
        return m

    def dead_fraction(self) -> float:
        return float((self.since_fired >= self.cfg.dead_after_tokens).float().mean())

    # ---- checkpoints

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.log_threshold is not None:
            with torch.no_grad():
                self.sae.threshold.copy_(self.log_threshold.exp())
        t = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        if self.log_threshold is not None:
            t["train.log_threshold"] = self.log_threshold.detach()
        for i, st in self.opt.state_dict()["state"].items():
            t.update({f"optim.{i}.{k}": v for k, v in st.items()})
        t["train.since_fired"] = self.since_fired
        t["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            t.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        t["rng.numpy"] = torch.from_numpy(np.random.get_state()[1].astype(np.int64))
        return {k: v.detach().cpu().clone() for k, v in t.items()}

    def state(self) -> dict[str, Any]:
        py = random.getstate()
        _, _, npos, has_gauss, gauss = np.random.get_state()
        keys = ("position", "tokens", "skipped", "consecutive", "thr_count", "scale", "log_coef")
        return {"config": self.cfg.to_dict(), **{k: getattr(self, k) for k in keys}, "history": self.history,
                "window": self.window, "rng_python": [py[0], list(py[1]), py[2]],
                "rng_numpy": [int(npos), int(has_gauss), float(gauss)]}

    def restore(self, ck: Checkpoint) -> None:
        cfg, t, s = self.cfg, ck.tensors, ck.state
        try:
            saved = TrainConfig.from_dict(s["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ck.path}: unreadable training config ({e})") from e
        diff = saved.differences(cfg)
        if diff:
            raise CheckpointError(f"{ck.path}: cannot resume with a different config: "
                                  + ", ".join(f"{k} was {saved.to_dict()[k]!r}, now {cfg.to_dict()[k]!r}" for k in diff))
        try:
            self.sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")}, strict=True)
            if self.log_threshold is not None:
                self.log_threshold.data.copy_(t["train.log_threshold"])
            opt = self.opt.state_dict()
            opt["state"] = {}
            for k, v in t.items():
                if k.startswith("optim."):
                    _, i, name = k.split(".", 2)
                    opt["state"].setdefault(int(i), {})[name] = v
            self.opt.load_state_dict(opt)
            self.since_fired = t["train.since_fired"].to(cfg.device)
            self.step = int(s["step"])
            for k in ("position", "tokens", "skipped", "consecutive", "thr_count"):
                setattr(self, k, int(s[k]))
            self.scale, self.log_coef = float(s["scale"]), float(s["log_coef"])
            self.history, self.window = list(s["history"]), dict(s["window"])
            torch.set_rng_state(t["rng.torch"])
            cuda = [t[k] for k in sorted(t) if k.startswith("rng.cuda.")]
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda)
            ver, mt, gauss = s["rng_python"]
            random.setstate((ver, tuple(mt), gauss))
            npos, has_gauss, cached = s["rng_numpy"]
            np.random.set_state(("MT19937", t["rng.numpy"].numpy().astype(np.uint32), npos, has_gauss, cached))
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ck.path}: incomplete or inconsistent training state ({e})") from e

    def folded_sae(self) -> SAE:
        """The SAE for raw activations: codes and b's divided by the scale, so decoder rows keep their norms."""
        s = self.scale
        sd = {k: v.detach().clone() for k, v in self.sae.state_dict().items()}
        if self.log_threshold is not None:
            sd["threshold"] = self.log_threshold.detach().exp()
        sd["b_enc"], sd["b_dec"] = sd["b_enc"] / s, sd["b_dec"] / s
        if "threshold" in sd and (self.log_threshold is not None or float(sd["threshold"]) >= 0):
            sd["threshold"] = sd["threshold"] / s
        return SAE.from_state_dict(self.cfg.sae, sd, source="trained SAE")


# ---------------------------------------------------------------- the loop


def train_sae(cfg: TrainConfig, source: Source, *, out_dir: str | os.PathLike | None = None, resume: bool = False,
              progress: bool = True, callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train an SAE as `cfg` says on batches from `source`; checkpoints and the final SAE go to `out_dir`.

    `resume=True` continues from the newest complete checkpoint in out_dir (or starts fresh if there is none);
    without it, an out_dir that already holds checkpoints is refused. A fresh run seeds python, numpy and torch
    with cfg.seed. `callback(step, metrics)` runs after every optimizer step (and after its checkpoint).
    """
    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs the out_dir holding the checkpoints")
    run = _Run(cfg)
    ck = None
    if out is not None and resume:
        ck = load_latest_checkpoint(out, device=cfg.device)
        if ck is None:
            log.info("no complete checkpoint in %s: starting a fresh run", out)
    elif out is not None and list_checkpoints(out):
        raise CheckpointError(f"{out} already holds checkpoints ({list_checkpoints(out)[-1].name}); pass resume=True "
                              "to continue that run, or choose another out_dir")
    if ck is not None:
        run.restore(ck)
        log.info("resumed from %s (step %d)", ck.path, run.step)
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    stream = BatchStream(source, cfg, run.position)
    if ck is None and run.step < cfg.n_steps:
        run.initialize(stream)
    start_step, start_tokens = run.step, run.tokens
    bar = progress_bar(total=cfg.n_steps, initial=run.step, enabled=progress, desc=f"train {cfg.sae.architecture}",
                       unit="step", dynamic_ncols=True)
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # notebooks often turn gradients off globally; training needs them
    try:
        while run.step < cfg.n_steps:
            x = stream.next()
            if x is None:
                warnings.warn(f"the source ran out after {stream.position} batches, at step {run.step} of "
                              f"{cfg.n_steps}; stopping early", stacklevel=2)
                break
            run.position = stream.position
            x = x.to(device=cfg.device, dtype=run.sae.dtype)
            xs = x * run.scale
            result = run.train_step(xs) if bool(torch.isfinite(x).all()) else None
            if result is None:
                run.skipped += 1
                run.consecutive += 1
                if run.consecutive >= cfg.max_consecutive_skips:
                    raise NonFiniteError(f"{run.consecutive} consecutive steps skipped (non-finite activations, "
                                         f"loss or gradients) at step {run.step}; {run.skipped} skipped in all")
                continue
            metrics = run.after_step(xs, result)
            bar.update(1)
            if run.step % 10 == 0 or run.step == cfg.n_steps:
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", L0=f"{metrics['l0']:.1f}",
                                FVU=f"{metrics['fvu']:.3f}", dead=f"{run.dead_fraction():.1%}", refresh=False)
            if out is not None and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 \
                    and run.step < cfg.n_steps:
                save_checkpoint(out, run.step, run.tensors(), run.state(), keep=cfg.keep_checkpoints)
            if callback is not None:
                callback(run.step, metrics)
    finally:
        torch.set_grad_enabled(grad_mode)
        bar.close()
    sae = run.folded_sae()
    sae_dir = None
    if out is not None:
        save_checkpoint(out, run.step, run.tensors(), run.state(), keep=cfg.keep_checkpoints)
        sae_dir = sae.save(out / SAE_DIR)
    seconds = time.perf_counter() - t0
    return TrainResult(sae=sae, history=list(run.history), steps=run.step, tokens=run.tokens,
                       skipped_steps=run.skipped, scale=run.scale, sae_dir=sae_dir, seconds=seconds,
                       tokens_per_s=(run.tokens - start_tokens) / seconds if run.step > start_step else 0.0)
