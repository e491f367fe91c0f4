"""AxBench concept detection: score held-out texts by the max over tokens, compare methods by AUROC.

Methods (all read the same site):
- DiffMean: mean non-BOS token activation of the positives minus that of the negatives, unit norm;
- Probe: logistic regression on the same token rows (labels from their text), its unit direction;
- SAE: the single latent whose max-over-tokens activation best separates the *training* texts;
- Random: a seeded random unit direction (the chance line).
A text's score is the max over its tokens of the projection (or of the latent's activation); AUROC treats
positives as 1 and generic plus hard negatives as 0, and is also given against the hard negatives alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from toolkit.analysis.axbench.concepts import Concept
from toolkit.analysis.probes import train_probe
from toolkit.analysis.table import Table
from toolkit.errors import EmptyInputError, check_finite
from toolkit.progress import progress_bar
from toolkit.tracing import capture

METHODS = ("DiffMean", "Probe", "SAE", "Random")


def text_token_acts(model: Any, site: str, texts: Sequence[str], *, batch_size: int = 8) -> list[torch.Tensor]:
    """Per text, its non-BOS token activations `(n_tokens, width)` at `site` (float32, CPU)."""
    if not texts:
        raise EmptyInputError("no texts to read activations from")
    acts = capture(model, list(texts), site, batch_size=batch_size, truncate=True)
    x = acts[site].float()
    keep = acts.attention_mask.bool() & (acts.input_ids != model.bos_token_id)
    check_finite(x[keep], f"activations at {site}")
    return [x[i][keep[i]] for i in range(len(texts))]


def max_projection(acts: list[torch.Tensor], direction: torch.Tensor) -> np.ndarray:
    """Each text's max over tokens of the projection on `direction`."""
    d = direction.float().cpu()
    return np.array([float((a @ d).max()) for a in acts])


def max_codes(sae: Any, acts: list[torch.Tensor]) -> torch.Tensor:
    """Each text's max over tokens of every SAE latent, `(n_texts, d_sae)`."""
    with torch.no_grad():
        codes = check_finite(sae.encode(torch.cat(acts).to(sae.device, sae.dtype)).float().cpu(), "SAE codes")
    return torch.stack([c.max(0).values for c in codes.split([len(a) for a in acts])])


def column_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every column of `scores` (n, m) against 0/1 `labels` (Mann-Whitney, ties counted half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=0)
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return (ranks[pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass
class ConceptDetection:
    """One concept's detectors: directions, the chosen latent, held-out scores and AUROCs, and steering units."""

    concept: str
    directions: dict[str, torch.Tensor]
    latent: int
    scores: dict[str, np.ndarray]
    labels: np.ndarray
    hard: np.ndarray
    """True for the hard negatives among the held-out texts."""
    auroc: dict[str, float] = field(default_factory=dict)
    auroc_hard: dict[str, float] = field(default_factory=dict)
    probe_cv_auroc: float = float("nan")
    site_norm: float = float("nan")
    """Median L2 norm of the training texts' token activations at the site: the steering unit."""

    @property
    def max_act(self) -> dict[str, float]:
        """Per method, the max detection score over the held-out texts: AxBench's unit for steering factors."""
        return {m: float(s.max()) for m, s in self.scores.items()}


def detect_concept(model: Any, sae: Any, concept: Concept, *, site: str | None = None, seed: int = 0,
                   batch_size: int = 8, memo: dict[Any, list[torch.Tensor]] | None = None) -> ConceptDetection:
    """Fit every detector on `concept`'s training texts and score its held-out texts.

    `memo` (a dict the caller keeps) reuses activations of text sets seen before, e.g. shared negatives."""
    from sklearn.metrics import roc_auc_score

    s = sae.check_compatible(model, site).name
    memo = {} if memo is None else memo

    def acts(texts: Sequence[str]) -> list[torch.Tensor]:
        key = (s, tuple(texts))
        if key not in memo:
            memo[key] = text_token_acts(model, s, texts, batch_size=batch_size)
        return memo[key]

    pos, neg, held = acts(concept.train_positive), acts(concept.train_negative), acts(concept.eval_texts)
    diff = torch.cat(pos).mean(0) - torch.cat(neg).mean(0)
    X = torch.cat(pos + neg)
    y = np.r_[np.ones(sum(map(len, pos)), int), np.zeros(sum(map(len, neg)), int)]
    groups = np.repeat(np.arange(len(pos) + len(neg)), [len(a) for a in pos + neg])
    probe = train_probe(X, y, groups=groups, seed=seed, site=s, pooling="token")
    rand = torch.randn(X.shape[1], generator=torch.Generator().manual_seed(seed))
    train_labels = np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
    latent = int(np.argmax(column_auroc(max_codes(sae, pos + neg).numpy(), train_labels)))
    dirs = {"DiffMean": diff / diff.norm(), "Probe": probe.direction, "Random": rand / rand.norm()}
    scores = {m: max_projection(held, d) for m, d in dirs.items()}
    scores["SAE"] = max_codes(sae, held)[:, latent].numpy()
    labels = np.array(concept.eval_labels)
    hard = np.r_[np.zeros(len(concept.eval_positive) + len(concept.eval_negative), bool),
                 np.ones(len(concept.eval_hard_negative), bool)]
    only_hard = (labels == 1) | hard
    det = ConceptDetection(concept.name, dirs, latent, {m: scores[m] for m in METHODS}, labels, hard,
                           probe_cv_auroc=probe.auroc, site_norm=float(X.norm(dim=1).median()))
    for m in METHODS:
        det.auroc[m] = float(roc_auc_score(labels, scores[m]))
        det.auroc_hard[m] = float(roc_auc_score(labels[only_hard], scores[m][only_hard]))
    return det


def detection_table(detections: Sequence[ConceptDetection]) -> Table:
    """Tidy rows: concept, method, AUROC (all held-out negatives), AUROC against hard negatives only."""
    return Table([{"concept": d.concept, "method": m, "auroc": d.auroc[m], "auroc_hard": d.auroc_hard[m]}
                  for d in detections for m in METHODS], ["concept", "method", "auroc", "auroc_hard"])


def detect_all(model: Any, sae: Any, concepts: Sequence[Concept], *, site: str | None = None, seed: int = 0,
               batch_size: int = 8, progress: bool = True) -> list[ConceptDetection]:
    """`detect_concept` for every concept, with a progress bar."""
    if not concepts:
        raise EmptyInputError("no concepts given; use load_concepts()")
    memo: dict[Any, list[torch.Tensor]] = {}  # the shared negatives are read once
    return [detect_concept(model, sae, c, site=site, seed=seed, batch_size=batch_size, memo=memo)
            for c in progress_bar(concepts, desc="AxBench detection", enabled=progress)]
