"""The standard SAE metrics over a corpus: L0, FVU, cosine, ΔLM loss, KL, dead and dense latents."""

from __future__ import annotations

import dataclasses
import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from toolkit.errors import EmptyInputError, check_finite, check_positive_int
from toolkit.progress import progress_bar
from toolkit.sae.sae import SAE
from toolkit.sae.splice import SpliceRecord, sae_splice
from toolkit.tracing import Ablate, run_with_edits

if TYPE_CHECKING:
    from toolkit.models import Model

_LABELS = {
    "n_tokens": "tokens evaluated (BOS excluded)",
    "l0": "L0 (active latents per token)",
    "fvu": "FVU (fraction of variance unexplained)",
    "explained_variance": "explained variance (1 - FVU)",
    "cosine": "cosine(x, reconstruction)",
    "ce_clean": "CE loss, clean",
    "ce_spliced": "CE loss, SAE spliced",
    "ce_zero_ablated": "CE loss, site zero-ablated",
    "delta_lm_loss": "ΔLM loss (spliced - clean)",
    "ce_recovered": "CE loss recovered vs zero-ablation",
    "kl": "KL(clean ‖ spliced), nats/token",
    "dead_fraction": "dead latents (never fired)",
    "dense_fraction": "dense latents (fire on > 10% of tokens)",
}


@dataclass(frozen=True)
class SAEMetrics:
    """Metrics of one SAE at one site over a corpus; renders as a table in Jupyter and in str()."""

    n_tokens: int
    l0: float
    fvu: float
    explained_variance: float
    cosine: float
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero_ablated: float | None = None
    delta_lm_loss: float | None = None
    ce_recovered: float | None = None
    kl: float | None = None
    dead_fraction: float = 0.0
    dense_fraction: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _rows(self) -> list[tuple[str, str]]:
        rows = []
        for k, v in self.as_dict().items():
            if v is None:
                continue
            rows.append((_LABELS[k], f"{v:,}" if isinstance(v, int) else f"{v:.4g}"))
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><td style='text-align:left'>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in self._rows())
        return f"<table><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>{body}</tbody></table>"


class _Accumulator:
    """Running sums for the reconstruction metrics (exact FVU with a streamed mean)."""

    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.sum_x = None
        self.sum_sq_x = 0.0
        self.sum_sq_err = 0.0
        self.sum_cos = 0.0
        self.sum_l0 = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.long)

    def add(self, x: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor, where: str = "the activations") -> None:
        check_finite(x, where)
        check_finite(recon, f"the SAE's reconstructions of {where}")
        x, recon = x.double(), recon.double()
        self.n += x.shape[0]
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq_x += float((x * x).sum())
        self.sum_sq_err += float(((x - recon) ** 2).sum())
        self.sum_cos += float(F.cosine_similarity(x, recon, dim=-1).sum())
        active = codes != 0
        self.sum_l0 += float(active.sum())
        self.fires += active.sum(0).cpu()

    def result(self, dense_threshold: float) -> dict[str, Any]:
        if self.n == 0:
            raise EmptyInputError("no tokens to evaluate (all positions were BOS or padding)")
        total_var = self.sum_sq_x - float((self.sum_x ** 2).sum()) / self.n
        fvu = self.sum_sq_err / total_var if total_var > 0 else math.nan
        density = self.fires.double() / self.n
        return {"n_tokens": self.n, "l0": self.sum_l0 / self.n, "fvu": fvu, "explained_variance": 1 - fvu,
                "cosine": self.sum_cos / self.n, "dead_fraction": float((self.fires == 0).double().mean()),
                "dense_fraction": float((density > dense_threshold).double().mean())}


def reconstruction_metrics(sae: SAE, x: torch.Tensor, *, batch_size: int = 4096,
                           dense_threshold: float = 0.1) -> SAEMetrics:
    """L0, FVU, cosine, dead/dense fractions of `sae` on activations `x` (n, d_in) — no model needed."""
    check_positive_int(batch_size, "batch_size")
    acc = _Accumulator(sae.d_sae)
    x = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(sae.device)
            out = sae(xb)
            acc.add(xb.cpu(), out.reconstruction.cpu(), out.codes.cpu(), f"activations (rows {i}..{i + len(xb) - 1})")
    return SAEMetrics(**acc.result(dense_threshold))


LOSS_CHUNK = 4
"""Positions per log-softmax in the loss metrics: the KL holds about five (batch, 4, 262k) fp32 blocks, 4 MB
each at batch 1, where the whole (2, 128, 262k) log-probabilities were 268 MB each (1.3 GB at once)."""


def _token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  other: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Per-position next-token cross-entropy for positions 1..T-2 (predictions made after BOS).

    With `other` logits also returns its cross-entropy and KL(logits || other) per position (all positions,
    flattened). Log-probabilities are made LOSS_CHUNK positions at a time, so no (b, T, vocab) copy is held.
    """
    tgt, ces, kls = ids[:, 2:], [], []
    for s in range(1, logits.shape[1] - 1, LOSS_CHUNK):
        e = min(s + LOSS_CHUNK, logits.shape[1] - 1)
        t = tgt[:, s - 1:e - 1, None]
        lp = logits[:, s:e].float().log_softmax(-1)
        ce = [-lp.gather(-1, t)[..., 0]]
        if other is not None:
            lo = other[:, s:e].float().log_softmax(-1)
            ce.append(-lo.gather(-1, t)[..., 0])
            kls.append((lp.exp() * (lp - lo)).sum(-1))
            del lo
        ces.append(ce)
        del lp
    keep = mask[:, 2:].bool()
    out = tuple(torch.cat(parts, 1)[keep] for parts in zip(*ces, strict=True))
    return (*out, torch.cat(kls, 1).flatten()) if other is not None else out


def evaluate_sae(sae: SAE, model: Model, contexts: torch.Tensor, site: str | None = None, *, batch_size: int = 2,
                 zero_ablation: bool = True, dense_threshold: float = 0.1, progress: bool = True) -> SAEMetrics:
    """All metrics over token `contexts` (n, ctx) that start with BOS; the SAE is spliced at every non-BOS position.

    ΔLM loss and KL compare the model's next-token predictions with and without the splice (same tokens,
    BOS position excluded from both the splice and the averages).
    """
    check_positive_int(batch_size, "batch_size")
    if contexts.ndim != 2 or contexts.shape[0] == 0 or contexts.shape[1] < 3:
        raise EmptyInputError(f"contexts must be (n >= 1, ctx >= 3) token ids; got {tuple(contexts.shape)}")
    record = SpliceRecord()
    edit = sae_splice(sae, model, site, record=record, positions=slice(1, None))
    acc = _Accumulator(sae.d_sae)
    ce_clean, ce_spliced, ce_zero, kl = [], [], [], []
    for i in progress_bar(range(0, contexts.shape[0], batch_size), desc=f"evaluate {edit.site}",
                           enabled=progress):
        ids = contexts[i:i + batch_size]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        clean, _ = run_with_edits(model, batch)
        record.clear()
        spliced, _ = run_with_edits(model, batch, [edit])
        acc.add(record.x[0].reshape(-1, sae.d_in), record.reconstruction[0].reshape(-1, sae.d_in),
                record.codes[0].reshape(-1, sae.d_sae), f"activations at {edit.site} (contexts {i}..{i + len(ids) - 1})")
        mask = batch["attention_mask"]
        c_clean, c_spliced, k = _token_losses(clean, ids, mask, spliced)
        ce_clean.append(c_clean)
        ce_spliced.append(c_spliced)
        kl.append(k)
        del clean, spliced
        if zero_ablation:
            ablated, _ = run_with_edits(model, batch, [Ablate(edit.site, positions=slice(1, None))])
            ce_zero.append(_token_losses(ablated, ids, mask)[0])
            del ablated
    c, s = float(torch.cat(ce_clean).mean()), float(torch.cat(ce_spliced).mean())
    z = float(torch.cat(ce_zero).mean()) if ce_zero else None
    recovered = (z - s) / (z - c) if z is not None and z != c else None
    return SAEMetrics(**acc.result(dense_threshold), ce_clean=c, ce_spliced=s, ce_zero_ablated=z,
                      delta_lm_loss=s - c, ce_recovered=recovered, kl=float(torch.cat(kl).mean()))
