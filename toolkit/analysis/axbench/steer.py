"""AxBench steering: a factor sweep per method, judged offline, best factor on one half of the instructions.

Methods: DiffMean and Probe directions (vector add at every position), the chosen SAE latent (its decoder row
added); and prompting, the baseline: the instruction asks for the concept in words, no steering, no factor.
Every method adds an edit of norm factor × the site's median token norm (`ConceptDetection.site_norm`), so one
factor means the same push for every method. AxBench's unit (factor × the method's max detection score) is not
used: on Gemma 3 270M DiffMean's projections are all negative, so its max is no scale at all.
The concept judge counts the words of the concept's description (`Concept.judge_lexicon`), as AxBench's LLM judge
reads only the description; `judge_validation` checks it on the held-out concept texts. Every continuation gets
the judge's three 0/1/2 scores and their harmonic mean (0 if any is 0). Per concept and method, the factor with
the best mean overall score on instructions of split A is reported on split B.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from toolkit.analysis.axbench.concepts import Concept
from toolkit.analysis.axbench.detect import ConceptDetection
from toolkit.analysis.judge import Judge, LexiconConcept
from toolkit.analysis.steering import LatentSteer, SteeringSpec, VectorSteer, sweep
from toolkit.analysis.table import Table
from toolkit.errors import EmptyInputError
from toolkit.progress import progress_bar
from toolkit.tracing import generate

FACTORS = (0.05, 0.1, 0.2, 0.4, 0.8)
STEER_METHODS = ("Prompt", "DiffMean", "Probe", "SAE")
SCORES = {"concept": "concept_score", "instruction": "instruction_score", "fluency": "fluency_score",
          "overall": "overall"}
"""Judge score -> table column (the "concept" column names the concept)."""


def prompted(instruction: str, concept: Concept) -> str:
    """The prompting baseline: the instruction, asking that the answer be about the concept."""
    head, sep, tail = instruction.rpartition("\nAnswer:")
    ask = f" Answer in a way that talks about {concept.description}."
    return f"{head}{ask}{sep}{tail}" if sep else instruction + ask


def _spec(method: str, det: ConceptDetection, sae: Any, site: str) -> SteeringSpec:
    """Strength 1 adds an edit of norm `det.site_norm` (a latent: its decoder row rescaled to that norm)."""
    if not det.site_norm > 0:
        raise ValueError(f"concept {det.concept!r}: the site norm {det.site_norm} is no steering unit; "
                         "run detect_concept again")
    if method == "SAE":
        lat = LatentSteer(sae, det.latent, "add", 1.0, name="SAE")
        unit = det.site_norm / float(lat.direction().norm())
        return SteeringSpec([LatentSteer(sae, det.latent, "add", 1.0, unit=unit, name="SAE")])
    return SteeringSpec([VectorSteer(det.directions[method], site, "add", 1.0, unit=det.site_norm, name=method)])


def concept_judge(model: Any, concept: Concept) -> Judge:
    """The offline judge of one concept: counts the words of its description (see the module docstring)."""
    return Judge(model, LexiconConcept(concept.judge_lexicon))


def judge_validation(concepts: Sequence[Concept]) -> Table:
    """The concept judge on held-out texts it never saw: mean concept score (0–2) on each concept's positives,
    generic negatives and hard negatives. A judge worth using scores positives well above generic negatives."""
    rows = []
    for c in concepts:
        score = LexiconConcept(c.judge_lexicon)
        rows.append({"concept": c.name, **{k: float(np.mean(score(list(getattr(c, f)))))
                                           for k, f in (("positive", "eval_positive"), ("negative", "eval_negative"),
                                                        ("hard_negative", "eval_hard_negative"))}})
    return Table(rows, ["concept", "positive", "negative", "hard_negative"])


def _rows(concept: str, method: str, factor: float, split: list[str], prompts: Sequence[str],
          gens: Sequence[str], judged: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"concept": concept, "method": method, "factor": factor, "split": split[i], "prompt_id": i,
             "generation": g, **{col: float(getattr(j, k)) for k, col in SCORES.items()}}
            for i, (g, j) in enumerate(zip(gens, judged, strict=True))]


def steer_concept(model: Any, sae: Any, concept: Concept, det: ConceptDetection, *, unsteered: Sequence[str],
                  factors: Sequence[float] = FACTORS, max_new_tokens: int = 24, batch_size: int = 16) -> Table:
    """Every method's generations and judge scores for one concept (plus the unsteered reference, method "none")."""
    prompts = list(concept.instructions)
    if len(unsteered) != len(prompts):
        raise ValueError(f"{len(unsteered)} unsteered continuations for {len(prompts)} instructions")
    split = ["A" if i < len(prompts) // 2 else "B" for i in range(len(prompts))]
    judge = concept_judge(model, concept)
    judge.calibrate(prompts, unsteered)
    rows = _rows(concept.name, "none", 0.0, split, prompts, unsteered, judge.score(prompts, unsteered))
    gens = generate(model, [prompted(p, concept) for p in prompts], max_new_tokens=max_new_tokens)
    rows += _rows(concept.name, "Prompt", 1.0, split, prompts, gens, judge.score(prompts, gens))
    site = sae.cfg.site
    for method in STEER_METHODS[1:]:
        table = sweep(model, prompts, _spec(method, det, sae, site), list(factors), scores=judge.scorers(),
                      max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
        rows += [{"concept": concept.name, "method": method, "factor": r["strength"], "split": split[r["prompt_id"]],
                  "prompt_id": r["prompt_id"], "generation": r["generation"],
                  **{col: r[k] for k, col in SCORES.items()}}
                 for r in table]
    return Table(rows)


def steer_all(model: Any, sae: Any, concepts: Sequence[Concept], detections: Sequence[ConceptDetection], *,
              factors: Sequence[float] = FACTORS, max_new_tokens: int = 24, batch_size: int = 16,
              progress: bool = True) -> Table:
    """`steer_concept` for every concept (unsteered continuations generated once per distinct instruction set)."""
    if not concepts or len(concepts) != len(detections):
        raise EmptyInputError(f"need one detection per concept; got {len(concepts)} concepts and "
                              f"{len(detections)} detections")
    rows: list[dict[str, Any]] = []
    memo: dict[tuple[str, ...], list[str]] = {}
    for c, d in progress_bar(list(zip(concepts, detections, strict=True)), desc="AxBench steering",
                             enabled=progress):
        if d.concept != c.name:
            raise ValueError(f"detection of {d.concept!r} given for concept {c.name!r}")
        key = tuple(c.instructions)
        if key not in memo:
            memo[key] = generate(model, list(key), max_new_tokens=max_new_tokens)
        rows += steer_concept(model, sae, c, d, unsteered=memo[key], factors=factors, max_new_tokens=max_new_tokens,
                              batch_size=batch_size).rows
    return Table(rows)


def best_factors(table: Table) -> Table:
    """Per concept and method: the factor with the best mean overall score on split A, and split B's scores there."""
    out = []
    for concept in dict.fromkeys(table["concept"]):
        for method in dict.fromkeys(table["method"]):
            rows = [r for r in table if r["concept"] == concept and r["method"] == method]
            if not rows:
                continue
            factors = sorted(set(r["factor"] for r in rows))
            on_a = {f: np.mean([r["overall"] for r in rows if r["factor"] == f and r["split"] == "A"]) for f in factors}
            best = max(factors, key=lambda f: (on_a[f], -f))  # ties: the gentler factor
            held = [r for r in rows if r["factor"] == best and r["split"] == "B"]
            out.append({"concept": concept, "method": method, "factor": best, "overall_A": float(on_a[best]),
                        **{col: float(np.mean([r[col] for r in held])) for col in SCORES.values()}})
    return Table(out, ["concept", "method", "factor", "overall_A", *SCORES.values()])
