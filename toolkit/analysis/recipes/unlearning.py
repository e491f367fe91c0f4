"""Unlearning by negative clamping (Farrell, Lau, Conmy 2024): suppress a knowledge domain with SAE latents.

Choose latents that fire often on forget-domain text and rarely on retain text (`choose_latents`), then at
every position (BOS untouched) set each chosen latent to -c where it is active (`LatentEdit`, mode
`negative`), keeping the SAE's error term. Controls: zero-ablation where active and scaling. Metrics: accuracy
on two-choice cloze items the model answered right before the edit (forget and retain domains) and the added
cross-entropy on ordinary text. Our choices: cloze items score by the summed log-probability of each option's
tokens (so there is no option order to swap); thresholds and k are arguments (the paper swept them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.analysis.recipes.latent_edit import LatentEdit
from toolkit.analysis.steering import token_activations
from toolkit.analysis.table import Table
from toolkit.errors import ArgumentError, EmptyInputError, ShapeMismatchError, check_finite
from toolkit.tracing import run_with_edits
from toolkit.tracing.intervene import Edit

if TYPE_CHECKING:
    from toolkit.models import Model
    from toolkit.sae.sae import SAE


def _token_logprobs(model: Model, prompts: Sequence[str], conts: Sequence[str], edits: Sequence[Edit],
                    batch_size: int) -> list[float]:
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, cs = prompts[i:i + batch_size], conts[i:i + batch_size]
        logits, _ = run_with_edits(model, [p + c for p, c in zip(ps, cs, strict=True)], list(edits))
        batch = model.tokenize([p + c for p, c in zip(ps, cs, strict=True)])
        for j, p in enumerate(ps):  # log-softmax of the continuation rows only: no (b, T, 262k) copy
            start, end = len(model.tokenize([p])["input_ids"][0]), int(batch["attention_mask"][j].sum())
            if end <= start:
                raise EmptyInputError(f"the continuation of item {i + j} adds no tokens to its prompt")
            ids = batch["input_ids"][j, start:end].to(logits.device)
            logp = torch.log_softmax(logits[j, start - 1:end - 1].float(), -1)
            out.append(float(logp.gather(-1, ids[:, None]).sum()))
    return out


def cloze_correct(model: Model, items: Sequence[Mapping[str, str]], edits: Sequence[Edit] = (), *,
                  batch_size: int = 8) -> np.ndarray:
    """1 where an item's right option is more likely than its wrong one (summed token log-probs), else 0."""
    if not items:
        raise EmptyInputError("items is empty; give {prompt, right, wrong} cloze items")
    bad = [i for i, it in enumerate(items) if not all(isinstance(it.get(k), str) and it[k].strip()
                                                      for k in ("prompt", "right", "wrong"))]
    if bad:
        raise ArgumentError(f"items {bad[:5]} need non-empty prompt, right and wrong strings")
    prompts = [it["prompt"] for it in items]
    right = _token_logprobs(model, prompts, [it["right"] for it in items], edits, batch_size)
    wrong = _token_logprobs(model, prompts, [it["wrong"] for it in items], edits, batch_size)
    return (np.array(right) > np.array(wrong)).astype(int)


def latent_frequencies(model: Model, sae: SAE, texts: Sequence[str], *, batch_size: int = 8) -> np.ndarray:
    """Fraction of the texts' non-BOS tokens on which each latent is active, `(d_sae,)`."""
    x = token_activations(model, sae.check_compatible(model).name, texts, batch_size=batch_size)
    with torch.no_grad():
        codes = sae.encode(x.to(sae.device, sae.dtype)).float().cpu()
    return check_finite((codes > 0).float().mean(0).numpy(), "latent frequencies")


def choose_latents(forget_freq: Any, retain_freq: Any, *, k: int = 10, min_forget: float = 0.02,
                   max_retain: float = 0.01) -> list[int]:
    """Up to `k` latents active on at least `min_forget` of forget tokens and at most `max_retain` of retain
    tokens, highest forget/retain frequency ratio first."""
    f, r = np.asarray(forget_freq, dtype=float), np.asarray(retain_freq, dtype=float)
    if f.shape != r.shape or f.ndim != 1:
        raise ShapeMismatchError(f"frequencies must be two vectors of one length; got {f.shape} and {r.shape}")
    check_finite(f, "forget frequencies")
    check_finite(r, "retain frequencies")
    if k < 1:
        raise ArgumentError(f"k must be at least 1, got {k}")
    ok = np.flatnonzero((f >= min_forget) & (r <= max_retain))
    if not len(ok):
        raise EmptyInputError(f"no latent fires on >= {min_forget:.0%} of forget tokens and <= {max_retain:.0%} of "
                              "retain tokens; relax the thresholds")
    ratio = f[ok] / (r[ok] + 1e-4)
    return [int(i) for i in ok[np.argsort(-ratio, kind="stable")][:k]]


def added_loss(model: Model, texts: Sequence[str], edits: Sequence[Edit], *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy on `texts` with `edits` minus without (nats per token)."""
    if not texts:
        raise EmptyInputError("texts is empty; give ordinary sentences")

    def ce(es: Sequence[Edit]) -> float:
        tot, n = 0.0, 0
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i:i + batch_size])
            logits, _ = run_with_edits(model, chunk, list(es))
            b = model.tokenize(chunk)
            ids, mask = b["input_ids"].to(logits.device), b["attention_mask"].to(logits.device).bool()
            for j in range(len(chunk)):  # row by row: no log-softmax copy of the whole (b, T, 262k) block
                lp = torch.log_softmax(logits[j, :-1].float(), -1).gather(-1, ids[j, 1:, None])[..., 0]
                tot -= float(lp[mask[j, 1:]].sum())
            n += int(mask[:, 1:].sum())
        return tot / n
    return ce(edits) - ce(())


def unlearning_table(model: Model, sae: SAE, items: Mapping[str, Sequence[Mapping[str, str]]],
                     conditions: Mapping[str, Sequence[Edit]], ordinary: Sequence[str]) -> Table:
    """Per condition: accuracy per domain on the items answered right without edits, and the added loss."""
    if not conditions or not items:
        raise EmptyInputError("give at least one condition and one domain of items")
    known = {d: [it for it, ok in zip(its, cloze_correct(model, its), strict=True) if ok] for d, its in items.items()}
    rows = []
    for name, edits in conditions.items():
        row: dict[str, Any] = {"condition": name}
        for d, its in known.items():
            row[d] = float(cloze_correct(model, its, edits).mean()) if its else float("nan")
        row["added_loss"] = added_loss(model, ordinary, edits) if edits else 0.0
        rows.append(row)
    return Table(rows, ["condition", *items, "added_loss"])


def negative_clamp(sae: SAE, latents: Sequence[int], c: float) -> LatentEdit:
    """The paper's intervention: chosen latents set to -c wherever they are active (BOS untouched)."""
    return LatentEdit(sae.cfg.site, sae=sae, latents=list(latents), mode="negative", value=c)


def unlearning_data() -> dict[str, Any]:
    """The hand-written items, selection texts and ordinary sentences."""
    from toolkit.analysis.recipes._data import load_data

    return load_data("unlearning")
