"""The hand-written concept set of the offline AxBench (JSON files beside this module, in `concepts/`).

Each concept has training texts (positives; negatives are shared across concepts, as in AxBench), held-out
evaluation texts (positives, shared generic negatives and the concept's own hard negatives: other senses of its
words), completion-style instructions (shared) and separate texts for the judge's concept classifier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from toolkit.errors import EmptyInputError

CONCEPT_NAMES = ("music", "cooking", "ocean", "programming")
MIN_TRAIN = 24
MIN_INSTRUCTIONS = 6


@dataclass(frozen=True)
class Concept:
    """One concept's texts (see the module docstring)."""

    name: str
    description: str
    lexicon: tuple[str, ...]
    train_positive: tuple[str, ...]
    train_negative: tuple[str, ...]
    eval_positive: tuple[str, ...]
    eval_negative: tuple[str, ...]
    eval_hard_negative: tuple[str, ...]
    instructions: tuple[str, ...]
    judge_positive: tuple[str, ...]
    judge_negative: tuple[str, ...]

    def __post_init__(self) -> None:
        for field in ("train_positive", "train_negative"):
            if len(getattr(self, field)) < MIN_TRAIN:
                raise ValueError(f"concept {self.name!r}: {field} has {len(getattr(self, field))} texts; "
                                 f"AxBench-style training needs at least {MIN_TRAIN}")
        for field in ("eval_positive", "eval_negative", "eval_hard_negative", "judge_positive", "judge_negative",
                      "lexicon"):
            if not getattr(self, field):
                raise EmptyInputError(f"concept {self.name!r}: {field} is empty")
        if len(self.instructions) < MIN_INSTRUCTIONS:
            raise ValueError(f"concept {self.name!r}: {len(self.instructions)} instructions; need at least "
                             f"{MIN_INSTRUCTIONS} (half choose the factor, half report)")
        texts = [t for f in ("train_positive", "train_negative", "eval_positive", "eval_negative",
                             "eval_hard_negative", "judge_positive") for t in getattr(self, f)]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise EmptyInputError(f"concept {self.name!r}: every text must be a non-empty string")

    @property
    def eval_texts(self) -> list[str]:
        """Held-out texts: positives, then generic negatives, then hard negatives."""
        return [*self.eval_positive, *self.eval_negative, *self.eval_hard_negative]

    @property
    def judge_lexicon(self) -> tuple[str, ...]:
        """The words the offline judge counts: the content words of the description plus the lexicon (the judge,
        like AxBench's LLM judge, sees only the concept's definition)."""
        from toolkit.analysis.judge import STOPWORDS, words

        found = [w for w in words(self.description) if len(w) >= 3 and w not in STOPWORDS]
        return tuple(dict.fromkeys([*found, *self.lexicon]))

    @property
    def eval_labels(self) -> list[int]:
        return [1] * len(self.eval_positive) + [0] * (len(self.eval_negative) + len(self.eval_hard_negative))


def _read(name: str) -> dict[str, Any]:
    path = resources.files("toolkit.analysis.axbench").joinpath("concepts", f"{name}.json")
    return json.loads(path.read_text(encoding="utf-8"))


def how_made() -> str:
    """The line on how the concept texts were made."""
    return str(_read("shared")["made"])


def load_concepts(names: tuple[str, ...] | list[str] | None = None) -> list[Concept]:
    """The packaged concepts (all four by default); the judge's negatives are the shared ones plus the other
    concepts' judge positives, so its classifier learns the concept rather than "any topic at all"."""
    names = list(CONCEPT_NAMES if names is None else names)
    unknown = [n for n in names if n not in CONCEPT_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown concept(s) {unknown}; the packaged concepts are {', '.join(CONCEPT_NAMES)}")
    shared = _read("shared")
    raw = {n: _read(n) for n in CONCEPT_NAMES}
    out = []
    for n in names:
        c = raw[n]
        others = [t for m in CONCEPT_NAMES if m != n for t in raw[m]["judge_positive"]]
        out.append(Concept(
            name=n, description=c["description"], lexicon=tuple(c["lexicon"]),
            train_positive=tuple(c["train_positive"]), train_negative=tuple(shared["train_negative"]),
            eval_positive=tuple(c["eval_positive"]), eval_negative=tuple(shared["eval_negative"]),
            eval_hard_negative=tuple(c["eval_hard_negative"]), instructions=tuple(shared["instructions"]),
            judge_positive=tuple(c["judge_positive"]), judge_negative=tuple(shared["judge_negative"]) + tuple(others)))
    return out
