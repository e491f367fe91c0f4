"""Personality vectors (Handa et al. 2025): Big Five trait directions from contrastive answers, purified against
other traits, steered within a clean strength range and judged by trait classifiers trained on separate texts.

A trait vector is the mean last-token difference between "Question: q\\nAnswer: <high-trait answer>" and the
same question with the low-trait answer, unit norm. The paper read the output of the post-attention layernorm
(our site kind `attn_out`); any site works, e.g. `resid_post`. Purification projects out the span of the other
traits' vectors. Steering adds the vector at every position in units of the site's median token norm. Choices
where the paper's details are not known to us: the prompt format above; three traits (openness,
conscientiousness, extraversion); "clean" = the unsteered model's per-token NLL of the continuation at most
`max_nll_excess` nats above the unsteered continuations' median and word-trigram repetition <= `max_repetition`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.analysis.judge import TfidfConcept, continuation_nll, repetition
from toolkit.analysis.steering import SteeringSpec, VectorSteer, pair_differences, site_unit, sweep
from toolkit.analysis.table import Table
from toolkit.errors import ArgumentError, EmptyInputError, NonFiniteError, ShapeMismatchError

if TYPE_CHECKING:
    from toolkit.models import Model


def answer_pairs(triples: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """(high, low) prompt texts from (question, high answer, low answer) triples."""
    if isinstance(triples, str) or not isinstance(triples, Sequence) or not triples:
        raise EmptyInputError("triples is empty; give (question, high-trait answer, low-trait answer) triples")
    bad = [i for i, t in enumerate(triples) if isinstance(t, str) or len(t) != 3 or not all(
        isinstance(s, str) and s.strip() for s in t)]
    if bad:
        raise ArgumentError(f"triples {bad[:5]} are not (question, high answer, low answer) non-empty strings")
    return [(f"Question: {q}\nAnswer: {hi}", f"Question: {q}\nAnswer: {lo}") for q, hi, lo in triples]


def trait_vector(model: Model, site: str, triples: Sequence[Sequence[str]], *, batch_size: int = 8) -> torch.Tensor:
    """Unit mean difference of last-token activations at `site`: high-trait answers minus low-trait ones."""
    d = pair_differences(model, site, answer_pairs(triples), batch_size=batch_size).mean(0)
    n = float(d.norm())
    if not np.isfinite(n) or n == 0:
        raise NonFiniteError(f"the trait vector at {site} is zero or non-finite: the answers do not differ there")
    return d / n


def purify(vector: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """`vector` with the span of `others` projected out, unit norm (orthogonal to each of them)."""
    if not isinstance(others, Sequence) or isinstance(others, torch.Tensor) or not others:
        raise EmptyInputError("purify needs at least one other vector to project out")
    for what, v in (("vector", vector), *((f"others[{i}]", o) for i, o in enumerate(others))):
        if not isinstance(v, torch.Tensor) or v.ndim != 1 or v.shape != vector.shape:
            raise ShapeMismatchError(f"{what} must be a 1-D tensor of shape {tuple(vector.shape)}, got "
                                     f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"{what} holds NaN/inf values")
    q, _ = torch.linalg.qr(torch.stack([o.double() for o in others], 1))
    v = vector.double() - q @ (q.T @ vector.double())
    n = float(v.norm())
    if n < 1e-6 * float(vector.norm()):
        raise ArgumentError("the vector lies (almost) inside the span of the others; nothing is left after purifying")
    return (v / n).float()


def trait_judges(traits: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, TfidfConcept]:
    """One TF-IDF classifier per trait, trained on its `high` vs `low` texts (separate from the triples)."""
    if not traits:
        raise EmptyInputError("no traits given; give {trait: {'high': [...], 'low': [...]}}")
    return {t: TfidfConcept(d["high"], d["low"]) for t, d in traits.items()}


def clean_scores(model: Model, prompts: Sequence[str], reference_nll: float, *, max_nll_excess: float = 1.5,
                 max_repetition: float = 0.3) -> Any:
    """A sweep score: 1.0 where a continuation is clean (see the module docstring), else 0.0."""
    def score(ps: Sequence[str], conts: Sequence[str]) -> list[float]:
        nll = continuation_nll(model, ps, conts)
        return [float(np.isfinite(n) and n - reference_nll <= max_nll_excess and repetition(c) <= max_repetition)
                for n, c in zip(nll, conts, strict=True)]
    return score


def personality_sweep(model: Model, vector: torch.Tensor, site: str, prompts: Sequence[str],
                      strengths: Sequence[float], judges: Mapping[str, TfidfConcept], *, max_new_tokens: int = 24,
                      max_nll_excess: float = 1.5, **kw: Any) -> Table:
    """Generate at each signed strength (units: the site's median token norm over the prompts) and score every
    continuation: each trait's classifier probability (columns `p_<trait>`) and `clean` (0/1)."""
    if not judges:
        raise EmptyInputError("judges is empty; give at least one trait classifier (trait_judges)")
    prompts = list(prompts)
    spec = SteeringSpec([VectorSteer(vector, site, "add", 0.0, unit=site_unit(model, site, prompts), name="trait")])
    base = spec.generate(model, prompts, max_new_tokens=max_new_tokens)
    ref = float(np.median([n for n in continuation_nll(model, prompts, base) if np.isfinite(n)]))
    scores: dict[str, Any] = {f"p_{t}": (lambda _p, c, j=j: j.probability(list(c)).tolist()) for t, j in judges.items()}
    scores["clean"] = clean_scores(model, prompts, ref, max_nll_excess=max_nll_excess)
    return sweep(model, prompts, spec, strengths, scores=scores, max_new_tokens=max_new_tokens, **kw)


def strength_summary(table: Table, *, min_clean: float = 0.75) -> Table:
    """Per strength: the mean of every score column and whether the strength is in the clean range
    (the contiguous strengths around 0 whose clean fraction is at least `min_clean`)."""
    cols = [c for c in table.columns if c.startswith("p_") or c == "clean"]
    strengths = sorted({r["strength"] for r in table})
    if not strengths:
        raise EmptyInputError("the sweep table is empty")
    rows = [{"strength": s, **{c: float(np.mean([r[c] for r in table if r["strength"] == s])) for c in cols}}
            for s in strengths]
    ok = [r["clean"] >= min_clean for r in rows]
    zero = int(np.argmin([abs(s) for s in strengths]))
    lo = hi = zero
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(rows) - 1 and ok[hi + 1]:
        hi += 1
    for i, r in enumerate(rows):
        r["in_clean_range"] = bool(lo <= i <= hi and ok[i])
    return Table(rows, ["strength", *cols, "in_clean_range"])


def is_monotone(values: Sequence[float], *, increasing: bool = True, tol: float = 0.0) -> bool:
    """Whether `values` never step against the direction by more than `tol`."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        raise ArgumentError(f"monotonicity needs at least two values, got {v.size}")
    d = np.diff(v) if increasing else -np.diff(v)
    return bool((d >= -tol).all())


def personality_data() -> dict[str, Any]:
    """The hand-written triples, classifier texts and prompts: {'traits': {...}, 'prompts': [...]}."""
    from toolkit.analysis.recipes._data import load_data

    return load_data("personality")
