"""An offline AxBench: hand-written concepts, detection AUROC and judged steering per method, on any model + SAE.

    result = run_axbench(model, sae)             # detection, then steering (minutes on the default model)
    result.summary                              # mean AUROC and steering score per method
    result.ordering()                           # does the paper's ordering reproduce here?
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.analysis.axbench.concepts import CONCEPT_NAMES, Concept, how_made, load_concepts
from toolkit.analysis.axbench.detect import (
    METHODS,
    ConceptDetection,
    detect_all,
    detect_concept,
    detection_table,
)
from toolkit.analysis.axbench.steer import (
    FACTORS,
    STEER_METHODS,
    best_factors,
    concept_judge,
    judge_validation,
    steer_all,
    steer_concept,
)
from toolkit.analysis.table import Table

__all__ = [
    "CONCEPT_NAMES", "FACTORS", "METHODS", "STEER_METHODS", "AxBenchResult", "Concept", "ConceptDetection",
    "best_factors", "concept_judge", "detect_all", "detect_concept", "detection_table", "how_made", "judge_validation", "load_concepts",
    "run_axbench",
    "steer_all", "steer_concept",
]


@dataclass
class AxBenchResult:
    """Detection per concept, every judged generation, and the best-factor table."""

    detections: list[ConceptDetection]
    steering: Table | None
    best: Table | None

    @property
    def detection(self) -> Table:
        return detection_table(self.detections)

    @property
    def summary(self) -> Table:
        """Per method: mean held-out AUROC (and vs hard negatives) and mean steering score at the best factor."""
        rows = []
        for m in dict.fromkeys([*STEER_METHODS, *METHODS, "none"]):
            row: dict[str, Any] = {"method": m}
            if m in METHODS:
                row["auroc"] = float(np.mean([d.auroc[m] for d in self.detections]))
                row["auroc_hard"] = float(np.mean([d.auroc_hard[m] for d in self.detections]))
            if self.best is not None and m in self.best["method"]:
                sel = [r for r in self.best if r["method"] == m]
                for k in ("overall", "concept_score", "instruction_score", "fluency_score"):
                    row[k] = float(np.mean([r[k] for r in sel]))
            if len(row) > 1:
                rows.append(row)
        return Table(rows, ["method", "auroc", "auroc_hard", "overall", "concept_score", "instruction_score",
                            "fluency_score"])

    def ordering(self) -> dict[str, bool]:
        """The paper's orderings, checked on these numbers: detection DiffMean ≈ Probe (within 0.05) and both
        > SAE; steering Prompt > DiffMean > SAE."""
        s = {r["method"]: r for r in self.summary}
        out = {"detection DiffMean ≈ Probe": abs(s["DiffMean"]["auroc"] - s["Probe"]["auroc"]) <= 0.05,
               "detection DiffMean > SAE": s["DiffMean"]["auroc"] > s["SAE"]["auroc"],
               "detection Probe > SAE": s["Probe"]["auroc"] > s["SAE"]["auroc"]}
        if self.best is not None:
            out["steering Prompt > DiffMean"] = s["Prompt"]["overall"] > s["DiffMean"]["overall"]
            out["steering DiffMean > SAE"] = s["DiffMean"]["overall"] > s["SAE"]["overall"]
        return out


def run_axbench(model: Any, sae: Any, concepts: Sequence[Concept] | None = None, *, steering: bool = True,
                factors: Sequence[float] = FACTORS, max_new_tokens: int = 24, seed: int = 0,
                progress: bool = True) -> AxBenchResult:
    """Detection for every concept, then (if `steering`) the judged factor sweeps; see the submodules."""
    concepts = list(concepts) if concepts is not None else load_concepts()
    dets = detect_all(model, sae, concepts, seed=seed, progress=progress)
    if not steering:
        return AxBenchResult(dets, None, None)
    table = steer_all(model, sae, concepts, dets, factors=factors, max_new_tokens=max_new_tokens, progress=progress)
    return AxBenchResult(dets, table, best_factors(table))
