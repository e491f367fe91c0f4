"""An offline, rule-based stand-in for AxBench's LLM judge: three 0/1/2 scores per steered continuation.

- concept: does the continuation express the target concept? A pluggable scorer: `LexiconConcept` (counts
  concept words) or `TfidfConcept` (a TF-IDF + logistic-regression classifier trained on separate texts),
  or any callable `texts -> scores in {0, 1, 2}`.
- instruction: does it stay on the prompt's topic? Recall of the prompt's content words (5-letter stems).
- fluency: is it fluent? The unsteered model's perplexity of the continuation, relative to the perplexity of
  unsteered continuations of the same prompts (`Judge.calibrate`), and repeated trigrams.
Combined as AxBench does: the harmonic mean of the three, 0 if any is 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.errors import EmptyInputError, check_finite, check_positive_int
from toolkit.tracing.guard import exclusive

if TYPE_CHECKING:
    from toolkit.models import Model

ConceptScorer = Callable[[Sequence[str]], Sequence[float]]

STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just let me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves one two many much may might must
shall like well get got make made way use used using write tell describe explain story text about sentence
""".split())
_WORD = re.compile(r"[a-z][a-z'-]*")


def words(text: str) -> list[str]:
    """Lower-case word tokens of `text`."""
    return _WORD.findall(text.lower())


_SUFFIXES = ("ing", "ies", "ed", "ly", "s")


def stem(word: str) -> str:
    """A crude stem: one common suffix off (keeping 3+ letters), then the first five letters
    ('cats' -> 'cat', 'oceans', 'oceanic' -> 'ocean', 'boiling' -> 'boil')."""
    word = word.lower()
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            word = word[: -len(suf)]
            break
    return word[:5]


def content_words(text: str) -> set[str]:
    """Stems of the words of `text` that are not stop words and have at least three letters."""
    return {stem(w) for w in words(text) if len(w) >= 3 and w not in STOPWORDS}


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{what} must hold only strings")
    return list(texts)


@dataclass(frozen=True)
class LexiconConcept:
    """Concept score from hits of concept words (matched by stem): 0 hits -> 0, `full` or more -> 2, else 1."""

    lexicon: tuple[str, ...]
    full: int = 2

    def __post_init__(self) -> None:
        lex = tuple(self.lexicon) if not isinstance(self.lexicon, str) else (self.lexicon,)
        if not lex or not all(isinstance(w, str) and w.strip() for w in lex):
            raise EmptyInputError("the concept lexicon is empty: give at least one concept word")
        object.__setattr__(self, "lexicon", lex)
        if self.full < 1:
            raise ValueError(f"full must be >= 1 hit, got {self.full}")

    def hits(self, text: str) -> int:
        return sum(stem(w) in self._stems for w in words(text))

    @property
    def _stems(self) -> frozenset[str]:
        return frozenset(stem(w) for w in self.lexicon)

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return [0.0 if h == 0 else 2.0 if h >= self.full else 1.0 for h in map(self.hits, _check_texts(texts, "texts"))]


class TfidfConcept:
    """Concept score from a TF-IDF + logistic-regression classifier trained on separate positive/negative texts:
    probability < `low` -> 0, >= `high` -> 2, else 1. Classes are weighted by their sizes (`balanced`), so more
    negative than positive texts do not push every probability below `low`."""

    def __init__(self, positives: Sequence[str], negatives: Sequence[str], *, low: float = 0.5, high: float = 0.8,
                 seed: int = 0) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        pos, neg = _check_texts(positives, "positives"), _check_texts(negatives, "negatives")
        if not pos or not neg:
            raise EmptyInputError(f"TfidfConcept needs positive and negative texts; got {len(pos)} and {len(neg)}")
        if not 0 < low <= high < 1:
            raise ValueError(f"need 0 < low <= high < 1, got low={low}, high={high}")
        self.low, self.high = low, high
        self.pipeline = make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1),
                                      LogisticRegression(C=10.0, max_iter=1000, class_weight="balanced",
                                                         random_state=seed))
        self.pipeline.fit(pos + neg, [1] * len(pos) + [0] * len(neg))

    def probability(self, texts: Sequence[str]) -> np.ndarray:
        return self.pipeline.predict_proba(_check_texts(texts, "texts"))[:, 1]

    def __call__(self, texts: Sequence[str]) -> list[float]:
        p = self.probability(texts)
        return [0.0 if q < self.low else 2.0 if q >= self.high else 1.0 for q in p.tolist()]


def instruction_score(prompt: str, continuation: str, *, full: float = 0.25) -> float:
    """Content-word recall of the prompt in the continuation: none -> 0, at least `full` -> 2, else 1."""
    want = content_words(prompt)
    if not want:
        return 2.0  # nothing to stay relevant to
    recall = len(want & content_words(continuation)) / len(want)
    return 0.0 if recall == 0 else 2.0 if recall >= full else 1.0


def repetition(text: str) -> float:
    """Fraction of word trigrams that repeat an earlier trigram (0 = none repeated)."""
    w = words(text)
    grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def harmonic(scores: Sequence[float]) -> float:
    """AxBench's aggregate: harmonic mean of the scores, 0 if any is 0."""
    if any(s <= 0 for s in scores):
        return 0.0
    return len(scores) / sum(1.0 / s for s in scores)


@torch.no_grad()
def continuation_nll(model: Model, prompts: Sequence[str], continuations: Sequence[str], *,
                     batch_size: int = 8) -> list[float]:
    """Mean negative log-likelihood per token of each continuation given its prompt, under `model` (unsteered).

    An empty continuation gets inf."""
    check_positive_int(batch_size, "batch_size")
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    tok, out = model.tokenizer, []
    for i in range(0, len(prompts), batch_size):
        rows, starts = [], []
        for p, c in zip(prompts[i:i + batch_size], continuations[i:i + batch_size], strict=True):
            pi = [model.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]]
            ci = tok(c, add_special_tokens=False)["input_ids"] if c else []
            rows.append((pi + ci)[: model.max_context])
            starts.append(len(pi))
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        off = max(min(starts) - 1, 0)  # logits from the first position that predicts a continuation token on
        with exclusive(model, "continuation_nll"):  # another thread's hooked generation must not edit this forward
            logits = model.hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                              logits_to_keep=width - off).logits.float()
        # row by row, continuation positions only: no masked copy or log-softmax of the whole (b, T, vocab) block
        for j, (r, s) in enumerate(zip(rows, starts, strict=True)):
            check_finite(logits[j, :len(r) - off], f"{model.name}'s logits for prompt {i + j}")
            if len(r) <= s:
                out.append(math.inf)
                continue
            tgt = ids[j, s:len(r), None].to(logits.device)
            out.append(float(-torch.log_softmax(logits[j, s - 1 - off:len(r) - 1 - off], -1).gather(-1, tgt).mean()))
    return out


@dataclass(frozen=True)
class JudgeScore:
    """One continuation's three 0/1/2 scores and their harmonic mean."""

    concept: float
    instruction: float
    fluency: float
    nll: float
    repetition: float

    @property
    def overall(self) -> float:
        return harmonic([self.concept, self.instruction, self.fluency])


class Judge:
    """Scores continuations offline; `calibrate` on unsteered continuations first (it sets the fluency baseline).

    fluency = 2 if the continuation's NLL exceeds the reference (median unsteered NLL) by at most `ppl_ok`
    (log-perplexity, nats/token) and repetition <= `rep_ok`; 0 if it exceeds by more than `ppl_bad` or
    repetition > `rep_bad` or the text is empty; else 1."""

    def __init__(self, model: Model, concept: ConceptScorer, *, ppl_ok: float = math.log(2.0),
                 ppl_bad: float = math.log(8.0), rep_ok: float = 0.2, rep_bad: float = 0.5,
                 instruction_full: float = 0.25) -> None:
        if not callable(concept):
            raise TypeError(f"concept must be a callable texts -> scores (e.g. LexiconConcept), got {type(concept).__name__}")
        if not 0 <= ppl_ok <= ppl_bad or not 0 <= rep_ok <= rep_bad <= 1:
            raise ValueError("need 0 <= ppl_ok <= ppl_bad and 0 <= rep_ok <= rep_bad <= 1")
        self.model, self.concept = model, concept
        self.ppl_ok, self.ppl_bad, self.rep_ok, self.rep_bad = ppl_ok, ppl_bad, rep_ok, rep_bad
        self.instruction_full = instruction_full
        self.reference_nll: float | None = None

    def calibrate(self, prompts: Sequence[str], unsteered: Sequence[str]) -> float:
        """Set the fluency baseline: the median NLL of unsteered continuations of `prompts`; returns it."""
        if not prompts:
            raise EmptyInputError("calibrate needs at least one prompt and its unsteered continuation")
        nll = [x for x in continuation_nll(self.model, prompts, unsteered) if math.isfinite(x)]
        if not nll:
            raise EmptyInputError("every unsteered continuation is empty; generate more tokens")
        self.reference_nll = float(np.median(nll))
        return self.reference_nll

    def fluency(self, nll: float, rep: float) -> float:
        if self.reference_nll is None:
            raise RuntimeError("call judge.calibrate(prompts, unsteered_continuations) before scoring fluency")
        excess = nll - self.reference_nll
        if not math.isfinite(nll) or excess > self.ppl_bad or rep > self.rep_bad:
            return 0.0
        return 2.0 if excess <= self.ppl_ok and rep <= self.rep_ok else 1.0

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[JudgeScore]:
        """Scores of each (prompt, continuation) pair."""
        prompts, continuations = _check_texts(prompts, "prompts"), _check_texts(continuations, "continuations")
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        concept = [float(c) for c in self.concept(continuations)]
        nll = continuation_nll(self.model, prompts, continuations)
        out = []
        for p, c, k, n in zip(prompts, continuations, concept, nll, strict=True):
            rep = repetition(c)
            out.append(JudgeScore(k, instruction_score(p, c, full=self.instruction_full), self.fluency(n, rep), n, rep))
        return out

    def scorers(self) -> dict[str, Callable[[Sequence[str], Sequence[str]], list[float]]]:
        """Batched score callables for `sweep(..., scores=judge.scorers())`: concept, instruction, fluency, overall.

        They share one scoring pass per batch (the NLL forward runs once)."""
        memo: dict[str, Any] = {}

        def field_of(name: str) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
            def fn(prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
                key = (tuple(prompts), tuple(continuations))
                if memo.get("key") != key:
                    memo["key"], memo["scores"] = key, self.score(prompts, continuations)
                return [getattr(s, name) for s in memo["scores"]]
            return fn

        return {name: field_of(name) for name in ("concept", "instruction", "fluency", "overall")}
