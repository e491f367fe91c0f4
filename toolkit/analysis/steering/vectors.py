"""Steering directions from data (DiffMean, CAA pairs, PCA of differences, a probe's weights) and the measured
scales that give strengths natural units (median activation norm at a site, a latent's max activation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.analysis.steering.spec import require_prompts
from toolkit.errors import EmptyInputError, NonFiniteError, ShapeMismatchError, check_finite
from toolkit.sae.sae import SAE
from toolkit.tracing import capture

if TYPE_CHECKING:
    from toolkit.models import Model


def token_activations(model: Model, site: str, texts: Sequence[str], *, batch_size: int = 8,
                      truncate: bool = True) -> torch.Tensor:
    """All non-BOS, non-pad token activations `(n_tokens, width)` of `texts` at `site` (float32, CPU)."""
    texts = require_prompts(texts, "texts")
    s = model.site(site).name
    x = capture(model, texts, s, batch_size=batch_size, truncate=truncate).tokens_only(s).float()
    return check_finite(x, f"activations at {s} (of {len(texts)} texts)")


def last_token_activations(model: Model, site: str, texts: Sequence[str], *, batch_size: int = 8) -> torch.Tensor:
    """The activation at each text's last token `(n_texts, width)` (float32, CPU)."""
    texts = require_prompts(texts, "texts")
    s = model.site(site).name
    acts = capture(model, texts, s, batch_size=batch_size, truncate=True)
    last = acts.attention_mask.sum(1) - 1
    return check_finite(acts[s][torch.arange(len(texts)), last].float(), f"last-token activations at {s}")


def _two_sets(positives: Sequence[str], negatives: Sequence[str]) -> tuple[list[str], list[str]]:
    pos_n = len(positives) if isinstance(positives, Sequence) and not isinstance(positives, str) else None
    neg_n = len(negatives) if isinstance(negatives, Sequence) and not isinstance(negatives, str) else None
    if pos_n == 0 or neg_n == 0:
        raise EmptyInputError(
            f"contrastive directions need both sets: got {pos_n} positive and {neg_n} negative texts; "
            "give at least one of each")
    return require_prompts(positives, "positives"), require_prompts(negatives, "negatives")


def diffmean(model: Model, site: str, positives: Sequence[str], negatives: Sequence[str], *,
             batch_size: int = 8) -> torch.Tensor:
    """AxBench's DiffMean: mean non-BOS token activation of the positives minus that of the negatives, unit norm."""
    pos, neg = _two_sets(positives, negatives)
    d = token_activations(model, site, pos, batch_size=batch_size).mean(0) - \
        token_activations(model, site, neg, batch_size=batch_size).mean(0)
    return _unit(d, "DiffMean")


def _pairs(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    if isinstance(pairs, str) or not isinstance(pairs, Sequence) or not pairs:
        raise EmptyInputError("contrastive pairs are empty: give a list of (positive, negative) text pairs")
    bad = [i for i, p in enumerate(pairs) if not (isinstance(p, (tuple, list)) and len(p) == 2)]
    if bad:
        raise TypeError(f"each pair must be (positive, negative); entries {bad[:5]} are not")
    return _two_sets([p for p, _ in pairs], [n for _, n in pairs])


def pair_differences(model: Model, site: str, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8) -> torch.Tensor:
    """Last-token activation differences (positive - negative) per pair, `(n_pairs, width)`."""
    pos, neg = _pairs(pairs)
    return last_token_activations(model, site, pos, batch_size=batch_size) - \
        last_token_activations(model, site, neg, batch_size=batch_size)


def caa(model: Model, site: str, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8) -> torch.Tensor:
    """Contrastive activation addition: the mean last-token difference over pairs (not normalised: its norm
    is the typical shift, so strength 1 adds it as measured)."""
    d = pair_differences(model, site, pairs, batch_size=batch_size).mean(0)
    if not torch.isfinite(d).all() or float(d.norm()) == 0:
        raise NonFiniteError("CAA vector is zero or non-finite: the pairs do not differ at this site")
    return d


def pca_direction(model: Model, site: str, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8) -> torch.Tensor:
    """First principal component of the pair differences (centred), signed to agree with their mean; unit norm."""
    diffs = pair_differences(model, site, pairs, batch_size=batch_size)
    if diffs.shape[0] < 2:
        raise EmptyInputError("PCA of differences needs at least 2 pairs")
    centred = diffs - diffs.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    d = vh[0]
    if float(d @ diffs.mean(0)) < 0:
        d = -d
    return _unit(d, "PCA direction")


def probe_direction(probe: Any, width: int | None = None) -> torch.Tensor:
    """A probe's weight vector as a unit direction: a tensor/array of shape (width,) or (1, width), or a
    fitted scikit-learn linear model (its `coef_`)."""
    w = getattr(probe, "coef_", probe)
    w = torch.as_tensor(np.asarray(w, dtype=np.float32)) if not isinstance(w, torch.Tensor) else w.detach().float()
    if w.ndim == 2 and w.shape[0] == 1:
        w = w[0]
    if w.ndim != 1:
        raise ShapeMismatchError(f"probe weights must be one vector (width,) or (1, width); got {tuple(w.shape)}")
    if width is not None and w.shape[0] != width:
        raise ShapeMismatchError(f"probe weights have width {w.shape[0]}, the site has width {width}")
    return _unit(w, "probe direction")


def _unit(d: torch.Tensor, what: str) -> torch.Tensor:
    bad = int((~torch.isfinite(d)).sum())
    if bad:
        raise NonFiniteError(f"{what} has {bad} non-finite values")
    n = float(d.norm())
    if n == 0:
        raise ValueError(f"{what} is the zero vector: the two sets have the same mean activation")
    return (d / n).float()


def site_unit(model: Model, site: str, texts: Sequence[str], *, batch_size: int = 8) -> float:
    """Median L2 norm of non-BOS token activations at `site` over `texts`: vector strength 1 = one typical norm."""
    return float(token_activations(model, site, texts, batch_size=batch_size).norm(dim=-1).median())


def latent_unit(model: Model, sae: SAE, latents: int | Sequence[int], texts: Sequence[str], *,
                site: str | None = None, batch_size: int = 8) -> float | list[float]:
    """Max activation of SAE latent(s) over the non-BOS tokens of `texts`: latent strength 1 = its max."""
    single = not isinstance(latents, Sequence)
    idx = [sae.check_feature(i) for i in ([latents] if single else latents)]
    s = sae.check_compatible(model, site).name
    with torch.no_grad():
        x = token_activations(model, s, texts, batch_size=batch_size)
        codes = check_finite(sae.encode(x.to(sae.device))[:, idx].float().cpu(), f"SAE codes at {s}")
    mx = codes.max(0).values
    dead = [i for i, m in zip(idx, mx.tolist(), strict=True) if m <= 0]
    if dead:
        raise ValueError(f"latent(s) {dead} never fire on these {len(texts)} texts, so they have no measured max; "
                         "give texts where they fire or pass unit= yourself")
    return float(mx[0]) if single else [float(m) for m in mx]


def projection_scores(model: Model, site: str, direction: torch.Tensor, texts: Sequence[str], *,
                      pool: str = "max", batch_size: int = 8) -> torch.Tensor:
    """Per-text detection score: the projection of token activations on `direction` pooled over non-BOS tokens
    (AxBench: max)."""
    texts = require_prompts(texts, "texts")
    if pool not in ("max", "mean", "last"):
        raise ValueError(f"pool must be max, mean or last; got {pool!r}")
    s = model.site(site).name
    width = model.site_width(s)
    if direction.shape[-1] != width:
        raise ShapeMismatchError(f"direction has width {direction.shape[-1]}, site {s} has width {width}")
    check_finite(direction, "the direction")
    acts = capture(model, texts, s, batch_size=batch_size, truncate=True)
    keep = acts.attention_mask.bool() & (acts.input_ids != model.bos_token_id)
    check_finite(acts[s][keep], f"activations at {s}")
    proj = acts[s].float() @ direction.float().cpu()
    if pool == "max":
        return proj.masked_fill(~keep, float("-inf")).max(1).values
    if pool == "mean":
        return (proj * keep).sum(1) / keep.sum(1).clamp(min=1)
    return proj[torch.arange(len(texts)), acts.attention_mask.sum(1) - 1]
