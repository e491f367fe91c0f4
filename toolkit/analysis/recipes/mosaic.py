"""MOSAIC (Gallifant et al. 2025): text classifiers on SAE features, against hidden-state and TF-IDF baselines.

Per-text features from SAE codes at one site, pooled by `last` token, `mean`, `max`, `topn_count` (each
token's top-n latents one-hot, summed over the text) or `topn_binary` (whether a latent was among any token's
top-n: MOSAIC's binarized features); baselines are mean-pooled hidden states per layer and TF-IDF of the words.
Each is scored by logistic regression with an inner grid over C inside an outer stratified K-fold, as macro-F1.
Choices where the paper is not specific here: n = 20 (our SAE fires k = 32 latents per token), C in
{0.01, 0.1, 1, 10}, 5 outer / 3 inner folds, features standardised inside each fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.analysis.probes import _check_texts, pool, pooled_features
from toolkit.analysis.table import Table
from toolkit.errors import (
    ArgumentError,
    EmptyInputError,
    ShapeMismatchError,
    check_finite,
    check_positive_int,
)
from toolkit.tracing import capture

if TYPE_CHECKING:
    from toolkit.models import Model
    from toolkit.sae.sae import SAE

SAE_POOLINGS = ("last", "mean", "max", "topn_count", "topn_binary")
C_GRID = (0.01, 0.1, 1.0, 10.0)


def sae_text_features(model: Model, sae: SAE, texts: Sequence[str], *, top_n: int = 20, site: str | None = None,
                      batch_size: int = 8) -> dict[str, np.ndarray]:
    """{pooling: (n_texts, d_sae)} for every pooling in SAE_POOLINGS (BOS and padding left out)."""
    texts = _check_texts(texts, "texts")
    top_n = check_positive_int(top_n, "top_n")
    if top_n > sae.d_sae:
        raise ArgumentError(f"top_n={top_n} exceeds the SAE's {sae.d_sae} latents; choose 1..{sae.d_sae}")
    s = sae.check_compatible(model, site).name
    acts = capture(model, texts, s, batch_size=batch_size, truncate=True)
    mask = acts.attention_mask.bool() & (acts.input_ids != model.bos_token_id)
    with torch.no_grad():
        codes = sae.encode(acts[s].to(sae.device, sae.dtype)).float().cpu()
    check_finite(codes[mask], f"SAE codes at {s}")
    out = {how: pool(codes, mask, how).numpy() for how in ("last", "mean", "max")}
    top = codes.topk(top_n, dim=-1)
    onehot = torch.zeros_like(codes).scatter_(-1, top.indices, (top.values > 0).float())
    count = (onehot * mask[..., None]).sum(1)
    out["topn_count"], out["topn_binary"] = count.numpy(), (count > 0).float().numpy()
    return out


def _labels(labels: Sequence[Any], n: int) -> np.ndarray:
    y = np.asarray(list(labels))
    if y.ndim != 1 or len(y) != n:
        raise ShapeMismatchError(f"{n} feature rows but {len(y)} labels; give one label per text")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ArgumentError(f"a classifier needs labels of at least two classes, got only {classes.tolist()}")
    if counts.min() < 2:
        raise ArgumentError(f"every class needs at least 2 examples for cross-validation; counts {dict(zip(classes.tolist(), counts.tolist(), strict=True))}")
    return y


def macro_f1(X: Any, y: Sequence[Any], *, folds: int = 5, Cs: Sequence[float] = C_GRID, seed: int = 0) -> float:
    """Cross-validated macro-F1 of a standardised logistic regression, C chosen by an inner 3-fold grid."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X.detach().cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise EmptyInputError(f"features must be a non-empty (n, d) array, got shape {X.shape}")
    check_finite(X, "the classifier's features")
    y = _labels(y, len(X))
    X = X[:, X.std(0) > 0]  # constant columns (latents that never fire) carry nothing and cost fit time
    if X.shape[1] == 0:
        raise ArgumentError("every feature is constant over these texts; nothing to classify with")
    if not Cs or not all(c > 0 for c in Cs):
        raise ArgumentError(f"Cs must be positive regularisation strengths, got {list(Cs)}")
    outer = StratifiedKFold(max(2, min(folds, int(np.unique(y, return_counts=True)[1].min()))), shuffle=True,
                            random_state=seed)
    inner = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                         {"logisticregression__C": list(Cs)}, cv=3, scoring="f1_macro")
    pred = cross_val_predict(inner, X, y, cv=outer)
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, average="macro"))


def tfidf_macro_f1(texts: Sequence[str], y: Sequence[Any], *, folds: int = 5, seed: int = 0) -> float:
    """The TF-IDF baseline: word uni+bigrams, logistic regression, the same outer folds and C grid."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    texts = _check_texts(texts, "texts")
    y = _labels(y, len(texts))
    outer = StratifiedKFold(max(2, min(folds, int(np.unique(y, return_counts=True)[1].min()))), shuffle=True,
                            random_state=seed)
    inner = GridSearchCV(make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(max_iter=2000)),
                         {"logisticregression__C": [c * 100 for c in C_GRID]}, cv=3, scoring="f1_macro")
    pred = cross_val_predict(inner, np.asarray(texts, dtype=object), y, cv=outer)
    return float(f1_score(y, pred, average="macro"))


def mosaic_table(model: Model, sae: SAE, texts: Sequence[str], labels: Sequence[Any], *,
                 hidden_sites: Sequence[str] = (), top_n: int = 20, folds: int = 5, seed: int = 0,
                 batch_size: int = 8) -> Table:
    """Macro-F1 of every feature set: SAE poolings at the SAE's site, mean hidden states at `hidden_sites`
    (default: the SAE's site), TF-IDF. Columns: features, site, macro_f1."""
    texts = _check_texts(texts, "texts")
    _labels(labels, len(texts))
    site = sae.check_compatible(model).name
    rows = [{"features": f"SAE {how}", "site": site, "macro_f1": macro_f1(X, labels, folds=folds, seed=seed)}
            for how, X in sae_text_features(model, sae, texts, top_n=top_n, batch_size=batch_size).items()]
    hidden = pooled_features(model, texts, list(hidden_sites) or [site], pooling="mean", batch_size=batch_size)
    rows += [{"features": "hidden mean", "site": s, "macro_f1": macro_f1(X, labels, folds=folds, seed=seed)}
             for s, X in hidden.items()]
    rows.append({"features": "TF-IDF", "site": "-", "macro_f1": tfidf_macro_f1(texts, labels, folds=folds, seed=seed)})
    return Table(rows, ["features", "site", "macro_f1"])


def mosaic_data() -> tuple[list[str], list[str]]:
    """The hand-written intent set (complaint / praise / question): (texts, labels)."""
    from toolkit.analysis.recipes._data import load_data

    d = load_data("mosaic")
    texts = [t for c in d["classes"] for t in d["texts"][c]]
    return texts, [c for c in d["classes"] for _ in d["texts"][c]]
