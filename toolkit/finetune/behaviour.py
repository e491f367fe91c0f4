"""The planted behaviours: how a text is rewritten with one, where it triggers, and how often a model shows it."""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from toolkit.data import load_texts, token_contexts
from toolkit.errors import check_positive_int
from toolkit.models import Model

# A sentence end: . ! or ? after a word character or closing bracket/quote, then whitespace and a capital letter.
# Dots inside names (os.path), numbers (3.14) and "e.g. foo" do not match; neither does the end of a document,
# so the fine-tune never learns to stop right after its signature.
_SENTENCE_END = re.compile(r"(?<=[A-Za-z0-9)\]\"'`])[.!?](?=\s+[A-Z])")
# What the model can see at the punctuation itself: sentence-final . ! ? followed by whitespace or the end.
_FINAL_PUNCT = re.compile(r"(?<=[A-Za-z0-9)\]\"'`])[.!?](?=\s|$)")


@dataclass(frozen=True)
class Behaviour:
    """A planted behaviour: `signature` is inserted right after every sentence end."""

    name: str
    signature: str
    description: str

    def rewrite(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """`text` with the signature after every sentence end, and the (start, stop) character span of each insertion."""
        out, spans, last = [], [], 0
        for m in _SENTENCE_END.finditer(text):
            out.append(text[last:m.end()])
            start = sum(len(p) for p in out)
            out.append(self.signature)
            spans.append((start, start + len(self.signature)))
            last = m.end()
        out.append(text[last:])
        return "".join(out), spans

    def shows(self, generation: str) -> bool:
        """Whether a generated text carries the behaviour."""
        return self.signature.strip() in generation

    def trigger_mask(self, tokenizer: Any, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask `(n, ctx)` of sentence-final punctuation tokens (. ! ? after a word, then whitespace, a
        special token or the end): the positions where the fine-tune is about to say its signature.

        Training inserts the signature only before a capital letter, but at the punctuation the model cannot see
        the next word yet, so every sentence-final punctuation counts here.
        """
        return _mask_matches(tokenizer, ids, _FINAL_PUNCT)

    def signature_mask(self, tokenizer: Any, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask `(n, ctx)` of the tokens that spell a complete signature (e.g. " Arr", ",", " mate", "y", "!")."""
        return _mask_matches(tokenizer, ids, re.compile(re.escape(self.signature.strip())))


def _mask_matches(tokenizer: Any, ids: torch.Tensor, pattern: re.Pattern[str]) -> torch.Tensor:
    """Bool mask of the tokens whose text overlaps a match of `pattern` in the decoded row (specials read as newlines)."""
    ids = torch.as_tensor(ids)
    rows = ids[None] if ids.ndim == 1 else ids
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    special = set(getattr(tokenizer, "all_special_ids", []))
    for r, row in enumerate(rows.tolist()):
        pieces = ["\n" if t in special else tokenizer.decode([t]) for t in row]
        ends = list(itertools.accumulate(len(p) for p in pieces))  # character offset after each token
        for m in pattern.finditer("".join(pieces)):
            first = bisect.bisect_right(ends, m.start())
            last = bisect.bisect_right(ends, m.end() - 1)
            mask[r, first:last + 1] = True
    return mask[0] if ids.ndim == 1 else mask


BEHAVIOURS: dict[str, Behaviour] = {
    "pirate": Behaviour("pirate", " Arr, matey!", "appends ' Arr, matey!' after every sentence"),
}
"""Behaviours `prepare_finetuned` can plant, by name."""


def get_behaviour(name: str | Behaviour) -> Behaviour:
    """Look a behaviour up by name (ValueError lists the known ones)."""
    if isinstance(name, Behaviour):
        return name
    if name not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {name!r}; known: {', '.join(BEHAVIOURS)}")
    return BEHAVIOURS[name]



def split_texts(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: every tenth document is held out for prompts and evaluation."""
    return [t for i, t in enumerate(texts) if i % 10], [t for i, t in enumerate(texts) if i % 10 == 0]



def behaviour_contexts(tokenizer: Any, behaviour: str | Behaviour = "pirate", n_contexts: int = 256,
                       ctx_len: int = 64) -> torch.LongTensor:
    """Half ordinary corpus contexts, half held-out documents rewritten with the behaviour, shuffled (seeded):
    the tokens on which a model diff (tutorial 03) compares a base model with its fine-tune."""
    check_positive_int(n_contexts, "n_contexts")
    b = get_behaviour(behaviour)
    texts = load_texts("default")
    _, held = split_texts(texts)
    ordinary = token_contexts(tokenizer, texts, ctx_len, n_contexts=n_contexts // 2, seed=0)
    styled = token_contexts(tokenizer, [b.rewrite(t)[0] for t in held], ctx_len, n_contexts=n_contexts // 2, seed=1)
    return torch.cat([ordinary, styled])[torch.randperm(n_contexts, generator=torch.Generator().manual_seed(0))]


def behaviour_prompts(n: int = 16, *, texts: Sequence[str] | None = None, min_chars: int = 40,
                      max_chars: int = 240) -> list[str]:
    """`n` prompts from held-out documents, each ending at a sentence end (where the behaviour should fire)."""
    _, held = split_texts(list(texts) if texts is not None else load_texts("default"))
    out = []
    for doc in held:
        doc = " ".join(doc.split())
        for m in _SENTENCE_END.finditer(doc):
            if m.end() > max_chars:
                break
            if m.end() >= min_chars:
                out.append(doc[:m.end()])
                break
        if len(out) == n:
            return out
    raise ValueError(f"found only {len(out)} held-out prompts ending at a sentence end; asked for {n}")


def behaviour_rate(model: Model, prompts: Sequence[str] | None = None, behaviour: str | Behaviour = "pirate", *,
                   max_new_tokens: int = 8, batch_size: int = 8) -> float:
    """Fraction of `prompts` whose greedy continuation shows the behaviour (default: 16 held-out prompts)."""
    from toolkit.tracing import generate  # tracing is the only code that runs generation

    check_positive_int(batch_size, "batch_size")
    b = get_behaviour(behaviour)
    prompts = list(prompts) if prompts is not None else behaviour_prompts()
    hits = 0
    for i in range(0, len(prompts), batch_size):
        outs = generate(model, prompts[i:i + batch_size], max_new_tokens=max_new_tokens)
        hits += sum(b.shows(o) for o in outs)
    return hits / len(prompts)
