"""AdaptiveK's complexity targets and probe: a proxy computed from the text itself, examples from an activation
cache, and the closed-form ridge fit with the penalty chosen by cross-validation.

The paper scores each context with an LLM judge; offline there is none, so the default proxy is a readability
grade: Flesch-Kincaid's formula with tokenizer pieces per word in place of syllables per word (rare and long
words split into more pieces, so the grade also rises with word rarity):

    grade = 0.39 · words / sentences + 11.8 · pieces / word - 15.59

Any other scores plug in: build `ComplexityData(activations, scores)` (scores in [0, 1]) or
`ComplexityData.from_raw(activations, raw)` (ranked into [0, 1]), or pass `scorer=` to `complexity_examples`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from toolkit.errors import ArgumentError, ShapeMismatchError, check_finite
from toolkit.keys import tensors_fingerprint
from toolkit.tracing import ActivationCache

_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)|\n\s*\n")
_WORD = re.compile(r"[A-Za-z]+")

Scorer = Callable[[Sequence[str], Any], torch.Tensor]
"""scorer(texts, tokenizer) -> (n,) raw complexity, larger = more complex."""


def text_complexity(texts: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """The readability-grade proxy (module docstring) of each text, float64 (n,); 0 for a text without words."""
    words = [_WORD.findall(t) for t in texts]
    joined = [" " + " ".join(w) for w in words]
    pieces = tokenizer(joined, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    out = []
    for text, w, p in zip(texts, words, pieces, strict=True):
        if not w:
            out.append(0.0)
            continue
        sentences = max(1, len([s for s in _SENTENCE_END.split(text) if _WORD.search(s)]))
        out.append(0.39 * len(w) / sentences + 11.8 * len(p) / len(w) - 15.59)
    return torch.tensor(out, dtype=torch.float64)


def rank_scores(raw: torch.Tensor) -> torch.Tensor:
    """Raw scores (n,) ranked into (0, 1): (rank + 0.5) / n, ties broken by position."""
    order = raw.argsort(stable=True)
    ranks = torch.empty_like(order).scatter_(0, order, torch.arange(len(raw)))
    return (ranks.double() + 0.5) / max(len(raw), 1)


@dataclass(frozen=True)
class ComplexityData:
    """What AdaptiveK's probe is fitted on: activations (n, d_in) of the last token of n contexts (raw units, as
    the SAE reads them) and each context's complexity in [0, 1]."""

    activations: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self) -> None:
        a, s = self.activations, self.scores
        if not isinstance(a, torch.Tensor) or a.ndim != 2 or not a.is_floating_point():
            raise ShapeMismatchError(f"complexity activations must be a floating (n, d_in) tensor, got "
                                     f"{getattr(a, 'dtype', type(a).__name__)} {tuple(getattr(a, 'shape', ()))}")
        if not isinstance(s, torch.Tensor) or s.shape != (a.shape[0],):
            raise ShapeMismatchError(f"complexity scores must be a tensor of shape ({a.shape[0]},), one per "
                                     f"activation row; got {tuple(getattr(s, 'shape', ())) or type(s).__name__}")
        if a.shape[0] < 4:
            raise ArgumentError(f"the complexity probe needs at least 4 examples, got {a.shape[0]}")
        check_finite(a, "complexity activations")
        check_finite(s, "complexity scores")
        if float(s.min()) < 0 or float(s.max()) > 1:
            raise ArgumentError(f"complexity scores must lie in [0, 1] (got {float(s.min()):.3g}..{float(s.max()):.3g});"
                                " use ComplexityData.from_raw to rank raw scores into [0, 1]")
        object.__setattr__(self, "activations", a.detach().float().cpu())
        object.__setattr__(self, "scores", s.detach().double().cpu())

    @classmethod
    def from_raw(cls, activations: torch.Tensor, raw: torch.Tensor) -> ComplexityData:
        """Ranked raw scores (any scale, larger = more complex) into [0, 1] (see rank_scores)."""
        return cls(activations, rank_scores(torch.as_tensor(raw, dtype=torch.float64)))

    def __len__(self) -> int:
        return self.activations.shape[0]

    @property
    def fingerprint(self) -> str:
        """Hash of the exact examples (a resumed run must see the same ones)."""
        return tensors_fingerprint({"activations": self.activations, "scores": self.scores})


def complexity_examples(cache: ActivationCache, contexts: torch.Tensor, tokenizer: Any, *, every: int = 16,
                        scorer: Scorer = text_complexity, site: str | None = None) -> tuple[ComplexityData, torch.Tensor]:
    """Examples for the probe from a cache filled from `contexts` (BOS first): the activation of every
    `every`-th position (and the last) with the complexity of the text up to it. Returns the data and the raw
    scores (n,)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ArgumentError(f"every must be a positive integer, got {every!r}")
    name = cache.resolve_site(site)
    rows, where = [], []
    last = contexts.shape[1] - 1
    for i in range(len(cache)):
        pos = cache.token_positions(i)
        keep = ((pos[:, 1] % every == 0) | (pos[:, 1] == last)) & (pos[:, 0] < contexts.shape[0])
        if bool(keep.any()):
            rows.append(cache.read(i, [name])[name][keep].float())
            where.append(pos[keep])
    if not rows:
        raise ArgumentError("no cached rows at the chosen positions; is this the cache of these contexts?")
    at = torch.cat(where)
    texts = tokenizer.batch_decode([contexts[c, 1:p + 1].tolist() for c, p in at.tolist()])
    raw = torch.as_tensor(scorer(texts, tokenizer), dtype=torch.float64)
    return ComplexityData.from_raw(torch.cat(rows), raw), raw


class ProbeFit(NamedTuple):
    """A ridge probe s = clamp(x · weight + bias, 0, 1) and how it was chosen."""

    weight: torch.Tensor
    bias: float
    penalty: float
    """The ridge penalty λ chosen by cross-validation."""
    cv_rmse: float
    """Mean held-out RMSE of the chosen λ over the folds."""


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    reg = torch.eye(xa.shape[1], dtype=x.dtype) * lam
    reg[-1, -1] = 0  # the bias is not penalized
    sol = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y)
    return sol[:-1], float(sol[-1])


def fit_probe(data: ComplexityData, lambdas: Sequence[float], *, folds: int = 5, seed: int = 0,
              scale: float = 1.0) -> ProbeFit:
    """Closed-form ridge regression of the scores on `scale` × activations, λ chosen by `folds`-fold
    cross-validation (held-out RMSE of the clamped prediction), then refitted on every example."""
    x, y = data.activations.double() * scale, data.scores
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chunks = order.tensor_split(min(folds, n))
    best: tuple[float, float] | None = None
    for lam in lambdas:
        errs = []
        for f, val in enumerate(chunks):
            train = torch.cat([c for g, c in enumerate(chunks) if g != f])
            w, b = _ridge(x[train], y[train], float(lam))
            errs.append(float(((x[val] @ w + b).clamp(0, 1) - y[val]).pow(2).mean().sqrt()))
        rmse = sum(errs) / len(errs)
        if best is None or rmse < best[1]:
            best = (float(lam), rmse)
    w, b = _ridge(x, y, best[0])
    return ProbeFit(w.float(), b, best[0], best[1])
