"""Sweep a steering spec over strengths: one batched generation per strength, scored, as a tidy table."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from toolkit.analysis.steering.items import check_strength
from toolkit.analysis.steering.spec import SteeringSpec, require_prompts
from toolkit.analysis.table import Table
from toolkit.errors import EmptyInputError, check_positive_int
from toolkit.progress import progress_bar
from toolkit.tracing.hooked import generate_hooked

if TYPE_CHECKING:
    from toolkit.models import Model

Score = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
"""A batched scorer: (prompts, continuations) -> one number per continuation (e.g. Judge.scorers())."""


def sweep(model: Model, prompts: Sequence[str], spec: SteeringSpec, strengths: Sequence[float], *,
          names: str | Sequence[str] | None = None, scores: Mapping[str, Score] | None = None,
          max_new_tokens: int = 20, batch_size: int = 16, do_sample: bool = False, seed: int | None = None,
          progress: bool = True) -> Table:
    """Generate for every prompt at every strength (the named items', default all) and score the continuations.

    Returns a Table with columns strength, prompt_id, prompt, generation and one column per score.
    Everything (spec against the model, strengths, prompts, scorers) is checked before the first forward."""
    if not isinstance(spec, SteeringSpec):
        raise TypeError(f"spec must be a SteeringSpec, got {type(spec).__name__}")
    prompts = require_prompts(prompts, "prompts")
    if isinstance(strengths, (int, float)) or not isinstance(strengths, Sequence) or not len(strengths):
        raise EmptyInputError("strengths must be a non-empty list of numbers, e.g. [0, 0.5, 1, 2]")
    strengths = [check_strength(s, f"strength {s!r}") for s in strengths]
    scores = dict(scores or {})
    for k, fn in scores.items():
        if not callable(fn):
            raise TypeError(f"score {k!r} must be a callable (prompts, continuations) -> numbers")
    check_positive_int(batch_size, "batch_size")
    plans = [spec.with_strength(s, names).edits(model) for s in strengths]  # validates every item up front

    rows = []
    bar = progress_bar(total=len(strengths) * len(prompts), desc="steering sweep", enabled=progress, unit="gen")
    try:
        for s, edits in zip(strengths, plans, strict=True):
            gens: list[str] = []
            for i in range(0, len(prompts), batch_size):
                gens += generate_hooked(model, prompts[i:i + batch_size], edits, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, seed=seed)
                bar.update(len(prompts[i:i + batch_size]))
            scored = {k: list(fn(prompts, gens)) for k, fn in scores.items()}
            for k, v in scored.items():
                if len(v) != len(gens):
                    raise ValueError(f"score {k!r} returned {len(v)} values for {len(gens)} continuations")
            for j, (p, g) in enumerate(zip(prompts, gens, strict=True)):
                rows.append({"strength": s, "prompt_id": j, "prompt": p, "generation": g,
                             **{k: float(v[j]) for k, v in scored.items()}})
    finally:
        bar.close()
    return Table(rows, ["strength", "prompt_id", "prompt", "generation", *scores])
