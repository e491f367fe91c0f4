"""Linear probes: scikit-learn logistic regression on pooled activations or SAE codes, cross-validated per site.

A probe's weight vector, mapped back to the site's units (undoing the feature scaling, and through the SAE
decoder for codes), is a steering direction: `Probe.direction` is unit-norm and `site`-wide.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from toolkit.analysis.table import Table
from toolkit.errors import EmptyInputError, ShapeMismatchError, check_finite
from toolkit.tracing import capture

POOLINGS = ("last", "mean", "max")


def pool(acts: torch.Tensor, mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Pool `(n, seq, d)` over the positions where `mask` `(n, seq)` is true: last, mean or max."""
    if how not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")
    if acts.ndim != 3 or mask.shape != acts.shape[:2]:
        raise ShapeMismatchError(f"pool needs acts (n, seq, d) and a mask (n, seq); got {tuple(acts.shape)} and "
                                 f"{tuple(mask.shape)}")
    mask = mask.bool()
    if not bool(mask.any(1).all()):
        raise EmptyInputError("a row has no position to pool (only BOS or padding); give each text some tokens")
    if how == "last":
        last = (mask.long() * torch.arange(mask.shape[1])).argmax(1)
        return acts[torch.arange(len(acts)), last]
    if how == "mean":
        return (acts * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return acts.masked_fill(~mask[..., None], -float("inf")).amax(1)


def _check_texts(texts: Any, what: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    if not texts or not all(t.strip() for t in texts):
        raise EmptyInputError(f"{what} is empty or holds an empty text; give at least one non-empty text")
    return list(texts)


def pooled_features(model: Any, texts: Sequence[str], sites: str | Sequence[str], *, pooling: str = "mean",
                    sae: Any = None, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{site: (n_texts, d)} pooled over each text's tokens (BOS and padding left out); SAE codes if `sae` is given."""
    texts = _check_texts(texts, "texts")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    names = [sites] if isinstance(sites, str) else list(sites)
    if sae is not None:
        names = [sae.check_compatible(model, s).name for s in names]
    acts = capture(model, texts, names, batch_size=batch_size)
    mask = acts.attention_mask.bool() & (acts.input_ids != model.bos_token_id)
    out = {}
    for name in names:
        x = acts[name].float()
        if sae is not None:
            with torch.no_grad():
                x = sae.encode(x.to(sae.device, sae.dtype)).float().cpu()
        check_finite(x[mask], f"{'SAE codes at ' if sae is not None else 'activations at '}{name}")
        out[model.site(name).name] = pool(x, mask, pooling)
    return out


@dataclass
class Probe:
    """A fitted probe: cross-validated AUROC/F1 and a unit steering direction in the site's units."""

    site: str
    pooling: str
    auroc: float
    f1: float
    accuracy: float
    direction: torch.Tensor
    """Unit vector (d_site,): the direction whose projection raises the probe's logit."""
    classifier: Any = field(repr=False)
    n_pos: int = 0
    n_neg: int = 0
    scale: float = 1.0
    """One number the features are divided by before the classifier (their RMS spread)."""

    def decision(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """The probe's logit for rows of features `X` (the same space it was trained on)."""
        X = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else X
        X = check_finite(np.asarray(X, dtype=np.float64), f"the features given to the probe at {self.site}")
        return self.classifier.decision_function(X / self.scale)


def _check_xy(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X.detach().cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if X.ndim != 2 or X.shape[0] == 0:
        raise EmptyInputError(f"probe features must be a non-empty (n, d) array, got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise ShapeMismatchError(f"{len(X)} feature rows but labels of shape {y.shape}; give one label per row")
    check_finite(X, "the probe's features")
    classes = np.unique(y)
    if len(classes) != 2:
        raise ValueError(f"a probe needs labels of exactly two classes (e.g. 0/1), got {classes.tolist()}")
    return X, (y == classes[1]).astype(int)


def train_probe(X: Any, y: Any, *, cv: int = 5, C: float = 1.0, seed: int = 0, groups: Any = None,
                site: str = "", pooling: str = "", decoder: torch.Tensor | None = None) -> Probe:
    """Fit a logistic regression; AUROC/F1 from `cv`-fold cross-validation (grouped if `groups`).

    Features are centred and divided by one shared scale, not standardised per feature: per-feature scaling
    would let noise on low-variance dimensions dominate the direction once mapped back to the site's units.

    `decoder` (d_features, d_site), e.g. an SAE's W_dec / input_scale, maps a direction over codes to the site.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _check_xy(X, y)
    smallest = int(min(y.sum(), len(y) - y.sum()))
    if smallest < 2:
        raise ValueError(f"each class needs at least 2 examples for cross-validation; the smaller has {smallest}")
    folds = max(2, min(cv, smallest))
    scale = float(np.sqrt(X.var(0).mean())) or 1.0
    X = X / scale
    clf = make_pipeline(StandardScaler(with_std=False), LogisticRegression(C=C, max_iter=5000))
    if groups is None:
        splitter: Any = StratifiedKFold(folds, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(clf, X, y, cv=splitter, groups=groups, method="decision_function")
    clf.fit(X, y)
    w = torch.tensor(clf[-1].coef_[0], dtype=torch.float32)  # the logit's gradient, up to the shared scale
    if decoder is not None:
        if decoder.shape[0] != len(w):
            raise ShapeMismatchError(f"decoder has {decoder.shape[0]} rows but the probe has {len(w)} features")
        w = w @ decoder.detach().float().cpu()
    return Probe(site, pooling, float(roc_auc_score(y, scores)), float(f1_score(y, scores > 0)),
                 float(accuracy_score(y, scores > 0)), w / w.norm().clamp(min=1e-12), clf, int(y.sum()),
                 int(len(y) - y.sum()), scale)


class ProbeTable(list):
    """Probes per site, rendered as a table in Jupyter."""

    def __repr__(self) -> str:
        """The same table as plain text (a list's repr would print every probe's direction tensor)."""
        return repr(Table([{"site": p.site, "pooling": p.pooling, "auroc_cv": round(p.auroc, 3), "f1_cv": round(p.f1, 3),
                            "accuracy_cv": round(p.accuracy, 3)} for p in self],
                          ["site", "pooling", "auroc_cv", "f1_cv", "accuracy_cv"]))

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(p.site)}</td><td>{p.pooling}</td><td>{p.auroc:.3f}</td>"
                       f"<td>{p.f1:.3f}</td><td>{p.accuracy:.3f}</td></tr>" for p in self)
        return ("<table><thead><tr><th>site</th><th>pooling</th><th>AUROC (cv)</th><th>F1 (cv)</th>"
                f"<th>accuracy (cv)</th></tr></thead><tbody>{rows}</tbody></table>")

    @property
    def best(self) -> Probe:
        """The probe with the highest cross-validated AUROC."""
        return max(self, key=lambda p: p.auroc)


def probe_sites(model: Any, positives: Sequence[str], negatives: Sequence[str], sites: str | Sequence[str], *,
                pooling: str = "mean", sae: Any = None, cv: int = 5, C: float = 1.0, seed: int = 0,
                batch_size: int = 8) -> ProbeTable:
    """One cross-validated probe per site separating `positives` from `negatives` (SAE codes if `sae`)."""
    pos, neg = _check_texts(positives, "positives"), _check_texts(negatives, "negatives")
    feats = pooled_features(model, pos + neg, sites, pooling=pooling, sae=sae, batch_size=batch_size)
    y = np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
    decoder = None if sae is None else (sae.W_dec / sae.input_scale).detach()
    return ProbeTable(train_probe(X, y, cv=cv, C=C, seed=seed, site=name, pooling=pooling, decoder=decoder)
                      for name, X in feats.items())
