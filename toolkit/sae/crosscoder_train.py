"""Train a crosscoder on paired activations, and collect those activations from two models.

Objectives (loss = sum over both models of |x_m - recon_m|^2, mean over tokens, in normalized units):
- 'batchtopk' ("Overcoming Sparsity Artifacts in Crosscoders"): the k * n_tokens largest weighted codes of the
  batch, plus the BatchTopK auxiliary loss that lets dead latents reconstruct the residual; the inference
  threshold is an exponential average of the smallest code kept per batch (BatchTopK paper).
- 'relu' (Anthropic's crosscoder): ReLU codes + l1_coeff * sum_j f_j (|d_j^base| + |d_j^ft|), ramped up.
Each model's activations are scaled by one scalar so that their mean squared norm is 1 (stored as input_scale).
Runs are deterministic on CPU; checkpoints are folders written atomically (manifest last) and a resumed run
equals an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.config import CrosscoderConfig
from toolkit.errors import CheckpointError, EmptyInputError, ShapeMismatchError
from toolkit.io import load_weight_folder, save_weight_folder
from toolkit.progress import progress_bar
from toolkit.sae.crosscoder import Crosscoder, PairedActivations
from toolkit.tracing.capture import iter_capture
from toolkit.tracing.sites import Site

CHECKPOINT_PREFIX = "step-"


@dataclass(frozen=True)
class CrosscoderTraining:
    """Optimisation settings of `train_crosscoder` (stored in checkpoints; resuming requires equal settings)."""

    steps: int = 1000
    batch_size: int = 512
    lr: float = 1e-3
    """Adam learning rate; decays linearly to 0 over the last `lr_decay` fraction of the steps."""
    lr_decay: float = 0.2
    l1_coeff: float = 1.0
    """'relu' only: weight of the decoder-norm-weighted L1 penalty (activations normalized to mean |x_m|^2 = 1)."""
    l1_warmup: float = 0.1
    """'relu' only: fraction of the steps over which the L1 weight ramps up from 0."""
    auxk_alpha: float = 1 / 32
    """'batchtopk' only: weight of the auxiliary loss on dead latents (0 turns it off)."""
    dead_after: int = 50
    """Steps without firing after which a latent counts as dead (for the auxiliary loss)."""
    threshold_start: float = 0.2
    """'batchtopk': fraction of the steps after which the inference threshold is estimated."""
    threshold_beta: float = 0.98
    """'batchtopk': decay of the threshold's exponential average."""
    normalize: bool = True
    """Scale each model's activations by one scalar to mean squared norm 1 (estimated on the first batches)."""
    seed: int = 0
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end, and only with a checkpoint_dir)."""
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "dead_after", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "l1_coeff", "auxk_alpha"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        for name in ("lr_decay", "l1_warmup", "threshold_start", "threshold_beta"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


@dataclass
class CrosscoderRun:
    """A trained crosscoder and what happened while training it."""

    crosscoder: Crosscoder
    history: dict[str, list[float]] = field(default_factory=dict)
    """Per step: 'loss', 'fvu' (both models, normalized units), 'l0' (codes per token), 'dead' (fraction)."""
    skipped_steps: int = 0
    """Steps skipped because the loss was not finite (weights unchanged)."""
    seconds: float = 0.0


Source = PairedActivations | torch.Tensor | tuple[Any, Any]
"""Paired activations in memory, a (n, 2, d) tensor (untagged), or (base cache, fine-tuned cache)."""


def _check_source(cc: Crosscoder, source: Source) -> int:
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


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (1 << 63)


def iter_paired(source: Source, batch_size: int, *, seed: int = 0, start: int = 0,
                site: str | None = None) -> Iterator[torch.Tensor]:
    """Endless `(batch_size, 2, d)` batches, reshuffled each epoch (seeded); `start=s` begins at batch s."""
    if isinstance(source, tuple):
        from toolkit.tracing import paired_batches

        per_epoch = source[0].n_batches(batch_size)
    else:
        data = source.acts if isinstance(source, PairedActivations) else source
        per_epoch = data.shape[0] // batch_size
    if per_epoch == 0:
        raise EmptyInputError(f"the source holds fewer rows than one batch of {batch_size}; pass more activations "
                              "or a smaller batch_size")
    epoch, skip = divmod(start, per_epoch)
    while True:
        if isinstance(source, tuple):
            yield from paired_batches(source[0], source[1], batch_size, site_a=site, site_b=site,
                                      seed=_epoch_seed(seed, epoch), start_batch=skip)
        else:
            perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
            for b in range(skip, per_epoch):
                yield data[perm[b * batch_size:(b + 1) * batch_size]].float()
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def _init_normalization(cc: Crosscoder, batches: Iterator[torch.Tensor], n: int, normalize: bool) -> None:
    xs = torch.cat([next(batches) for _ in range(n)]).to(cc.device, cc.dtype)
    xs = xs[torch.isfinite(xs).all(dim=-1).all(dim=-1)]  # NaN rows are skipped in training; ignore them here too
    if not len(xs):
        return
    if normalize:
        cc.input_scale.copy_(xs.pow(2).sum(-1).mean(0).clamp_min(1e-12).rsqrt())
    cc.b_dec.copy_((xs * cc.input_scale[:, None]).mean(0))


def _aux_loss(cc: Crosscoder, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """BatchTopK auxiliary loss: the top dead latents per token reconstruct the (detached) residual."""
    idx = dead.nonzero().squeeze(1)
    f = torch.relu(pre[:, idx])
    k_aux = min(cc.d_in // 2, idx.numel())
    keep = (f * cc.code_weights()[idx]).topk(k_aux, dim=-1).indices
    f = f * torch.zeros_like(f, dtype=torch.bool).scatter_(-1, keep, True)
    recon = (f @ cc.W_dec[idx].reshape(idx.numel(), 2 * cc.d_in)).view(-1, 2, cc.d_in)
    target = err.detach()
    return (target - recon).pow(2).sum((-1, -2)).mean() / target.pow(2).sum((-1, -2)).mean().clamp_min(1e-12)


@torch.enable_grad()  # notebooks often turn gradients off globally
def train_crosscoder(cfg: CrosscoderConfig, source: Source, training: CrosscoderTraining | None = None, *,
                     checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
                     progress: bool = True, **overrides: Any) -> CrosscoderRun:
    """Train a crosscoder on `source` (checked against cfg.models / cfg.site / cfg.d_in first).

    `overrides` replace fields of `training` (e.g. steps=500). With `checkpoint_dir`, checkpoints are written
    there (see CrosscoderTraining.checkpoint_every) and `resume=True` continues from the newest complete one.
    """
    tr = CrosscoderTraining(**{**asdict(training or CrosscoderTraining()), **overrides})
    cc = Crosscoder(cfg, seed=tr.seed)
    _check_source(cc, source)
    site = cfg.site if isinstance(source, tuple) else None
    opt = torch.optim.Adam(cc.parameters(), lr=tr.lr)
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    history: dict[str, list[float]] = {"loss": [], "fvu": [], "l0": [], "dead": []}
    start, skipped = 0, 0
    ckpt = _latest_checkpoint(checkpoint_dir) if (resume and checkpoint_dir is not None) else None
    if ckpt is not None:
        start, skipped, history = _restore(ckpt, cc, opt, since_fired, cfg, tr)
    else:
        _init_normalization(cc, iter_paired(source, tr.batch_size, seed=tr.seed, site=site),
                            min(8, max(1, math.ceil(4096 / tr.batch_size))), tr.normalize)
    decay_from = tr.steps * (1 - tr.lr_decay)
    t0 = time.perf_counter()
    cc.train()
    batches = iter_paired(source, tr.batch_size, seed=tr.seed, start=start, site=site)
    bar = progress_bar(range(start, tr.steps), desc=f"crosscoder ({cfg.architecture})", enabled=progress,
                       initial=start, total=tr.steps)
    for step in bar:
        x = next(batches).to(cc.device)
        for g in opt.param_groups:
            g["lr"] = tr.lr * min(1.0, (tr.steps - step) / max(tr.steps - decay_from, 1e-9))
        xn = cc.normalize(x)
        pre = cc.pre_activations(xn)
        codes = cc.activate(pre)
        err = xn - cc.decode_normalized(codes)
        mse = err.pow(2).sum((-1, -2)).mean()
        loss = mse
        dead = since_fired >= tr.dead_after
        if cfg.architecture == "relu":
            ramp = min(1.0, (step + 1) / max(tr.l1_warmup * tr.steps, 1.0))
            loss = loss + tr.l1_coeff * ramp * (codes * cc.code_weights()).sum(-1).mean()
        elif tr.auxk_alpha > 0 and bool(dead.any()):
            loss = loss + tr.auxk_alpha * _aux_loss(cc, pre, err, dead.to(cc.device))
        if not bool(torch.isfinite(loss)):
            skipped += 1  # reliability case 4: a non-finite step changes nothing
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            fired = (codes > 0).any(0).cpu()
            since_fired += 1
            since_fired[fired] = 0
            if cfg.architecture == "batchtopk" and step >= tr.threshold_start * tr.steps and bool(fired.any()):
                smallest = (codes * cc.code_weights())[codes > 0].min()
                t = cc.threshold
                t.copy_(smallest if float(t) < 0 else tr.threshold_beta * t + (1 - tr.threshold_beta) * smallest)
            total = (xn - xn.mean(0)).pow(2).sum()
            history["loss"].append(float(loss))
            history["fvu"].append(float(err.pow(2).sum() / total.clamp_min(1e-12)))
            history["l0"].append(float((codes > 0).sum(-1).float().mean()))
            history["dead"].append(float(dead.float().mean()))
        bar.set_postfix(fvu=f"{history['fvu'][-1]:.3f}", l0=f"{history['l0'][-1]:.1f}", refresh=False)
        done = step + 1
        if checkpoint_dir is not None and (done == tr.steps or (tr.checkpoint_every and done % tr.checkpoint_every == 0)):
            _save_checkpoint(Path(checkpoint_dir), done, cc, opt, since_fired, cfg, tr, history, skipped)
    cc.eval()
    return CrosscoderRun(cc, history, skipped, time.perf_counter() - t0)


# ------------------------------------------------------------------ checkpoints


def _save_checkpoint(folder: Path, step: int, cc: Crosscoder, opt: torch.optim.Optimizer, since_fired: torch.Tensor,
                     cfg: CrosscoderConfig, tr: CrosscoderTraining, history: dict[str, list[float]], skipped: int) -> None:
    names = {id(p): n for n, p in cc.named_parameters()}
    tensors = {f"cc.{k}": v for k, v in cc.state_dict().items()}
    adam_step = 0
    for p, st in opt.state.items():
        tensors[f"opt.{names[id(p)]}.exp_avg"] = st["exp_avg"]
        tensors[f"opt.{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"]
        adam_step = int(st["step"])
    tensors["since_fired"] = since_fired
    meta = {"crosscoder": cfg.to_dict(), "training": asdict(tr), "step": step, "adam_step": adam_step,
            "skipped": skipped, "history": history}
    save_weight_folder(folder / f"{CHECKPOINT_PREFIX}{step:08d}", tensors, meta)
    for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-tr.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint in `folder` whose manifest verifies (incomplete or corrupt ones are passed over)."""
    for path in sorted(Path(folder).glob(f"{CHECKPOINT_PREFIX}*"), reverse=True):
        try:
            return load_weight_folder(path)
        except CheckpointError:
            continue
    return None


def _restore(ckpt: tuple[dict[str, torch.Tensor], dict[str, Any]], cc: Crosscoder, opt: torch.optim.Optimizer,
             since_fired: torch.Tensor, cfg: CrosscoderConfig, tr: CrosscoderTraining) -> tuple[int, int, dict]:
    tensors, meta = ckpt
    if meta.get("crosscoder") != cfg.to_dict() or meta.get("training") != asdict(tr):
        raise ValueError("cannot resume: the checkpoint was made with another crosscoder config or training "
                         f"settings ({meta.get('crosscoder')}, {meta.get('training')}); use an empty checkpoint_dir")
    cc.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("cc.")})
    state = {}
    for i, (name, _) in enumerate(cc.named_parameters()):
        if f"opt.{name}.exp_avg" in tensors:
            state[i] = {"step": torch.tensor(float(meta["adam_step"])), "exp_avg": tensors[f"opt.{name}.exp_avg"],
                        "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"]}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    since_fired.copy_(tensors["since_fired"])
    return int(meta["step"]), int(meta["skipped"]), meta["history"]


# ------------------------------------------------------------------ data and evaluation


def capture_pair(base: Any, ft: Any, contexts: torch.Tensor, site: str | Site, *, batch_size: int = 8,
                 progress: bool = True) -> PairedActivations:
    """Activations of both models at `site` on the same token contexts `(n, ctx)`, BOS positions dropped."""
    site = base.site(site)
    ft.site(site)
    if base.site_width(site) != ft.site_width(site):
        raise ShapeMismatchError(f"site {site.name} is {base.site_width(site)} wide in {base.name} but "
                                 f"{ft.site_width(site)} in {ft.name}")
    keep = contexts != base.bos_token_id
    per_model = []
    for m in (base, ft):
        parts = [acts[site.name][keep[i:i + acts[site.name].shape[0]]]
                 for i, acts in iter_capture(m, contexts, [site], batch_size=batch_size, progress=progress,
                                             desc=f"capture {m.name} {site.name}")]
        per_model.append(torch.cat(parts).float())
    rows, pos = keep.nonzero(as_tuple=True)
    return PairedActivations(torch.stack(per_model, dim=1), (base.name, ft.name), site.name, contexts.clone(),
                             torch.stack([rows, pos], dim=1))


@torch.no_grad()
def evaluate_crosscoder(cc: Crosscoder, source: PairedActivations | torch.Tensor, *,
                        batch_size: int = 2048) -> dict[str, float]:
    """Inference-mode quality: FVU of each model's reconstruction (raw units), L0 and fraction of dead latents."""
    n = _check_source(cc, source)
    data = source.acts if isinstance(source, PairedActivations) else source
    if n == 0:
        raise EmptyInputError("no activations to evaluate on")
    was = cc.training
    cc.eval()
    mean = data.float().mean(0).to(cc.device)
    sq_err, sq_tot, l0, fired = torch.zeros(2), torch.zeros(2), 0.0, torch.zeros(cc.d_sae, dtype=torch.bool)
    for i in range(0, n, batch_size):
        x = data[i:i + batch_size].to(cc.device, cc.dtype)
        out = cc(x)
        sq_err += (x - out.reconstruction).pow(2).sum((0, 2)).cpu()
        sq_tot += (x - mean).pow(2).sum((0, 2)).cpu()
        l0 += float((out.codes > 0).sum())
        fired |= (out.codes > 0).any(0).cpu()
    cc.train(was)
    fvu = sq_err / sq_tot.clamp_min(1e-12)
    return {"fvu_base": float(fvu[0]), "fvu_ft": float(fvu[1]), "fvu": float(sq_err.sum() / sq_tot.sum()),
            "l0": l0 / n, "dead_fraction": float((~fired).float().mean()), "n_tokens": n}


def split_paired(acts: PairedActivations, fractions: Sequence[float] = (0.9, 0.1)) -> list[PairedActivations]:
    """Split by whole contexts (not tokens) into parts, e.g. train / held-out; tags and tokens are kept."""
    if acts.positions is None:
        raise ValueError("split_paired needs positions (activations from capture_pair or from_caches)")
    n_ctx = int(acts.positions[:, 0].max()) + 1 if len(acts) else 0
    bounds = [round(sum(fractions[:i]) * n_ctx) for i in range(len(fractions) + 1)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        m = (acts.positions[:, 0] >= lo) & (acts.positions[:, 0] < hi)
        out.append(PairedActivations(acts.acts[m], acts.models, acts.site, acts.tokens, acts.positions[m]))
    return out
