"""A truth probe ("A Single Direction of Truth", O'Neill et al. 2025): detect continuations that contradict their
context with a linear probe on an observer's residual stream, then steer a generator with the probe direction.

The observer reads `context + " " + continuation`; features are the activations mean-pooled over the
continuation's tokens, one cross-validated probe per layer (folds grouped by context, so a context's two
continuations never sit on both sides of a split). Here observer and generator are the same model (the paper
used separate ones). Steering adds the unit probe direction (pointing towards "contradicts") at every position,
in units of the site's median token norm; negative strengths push towards faithful text. What counts as an
invented fact is our choice: a number (digits or a number word) or a capitalised word not at a sentence start
that does not occur in the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.analysis.probes import ProbeTable, _check_texts, train_probe
from toolkit.analysis.steering import SteeringSpec, VectorSteer, site_unit, sweep
from toolkit.analysis.table import Table
from toolkit.errors import ArgumentError, EmptyInputError, ShapeMismatchError, check_finite
from toolkit.tracing import capture

if TYPE_CHECKING:
    from toolkit.analysis.probes import Probe
    from toolkit.models import Model

NUMBER_WORDS = frozenset("""one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million
first second third fourth fifth""".split())
_TOKEN = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+(?:[.,]\d+)?|[.!?]")


def _check_pairs(contexts: Sequence[str], continuations: Sequence[str]) -> tuple[list[str], list[str]]:
    contexts, continuations = _check_texts(contexts, "contexts"), _check_texts(continuations, "continuations")
    if len(contexts) != len(continuations):
        raise ShapeMismatchError(f"{len(contexts)} contexts but {len(continuations)} continuations; give one each")
    return contexts, continuations


def continuation_features(model: Model, contexts: Sequence[str], continuations: Sequence[str],
                          sites: str | Sequence[str], *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{site: (n, d)} the observer's activations mean-pooled over each continuation's tokens."""
    contexts, continuations = _check_pairs(contexts, continuations)
    names = [model.site(s).name for s in ([sites] if isinstance(sites, str) else sites)]
    if not names:
        raise EmptyInputError("sites is empty; give at least one site such as 'blocks.6.resid_post'")
    acts = capture(model, [f"{c} {x}" for c, x in zip(contexts, continuations, strict=True)], names,
                   batch_size=batch_size, truncate=True)
    starts = torch.tensor([len(model.tokenize([c])["input_ids"][0]) for c in contexts])
    pos = torch.arange(acts.input_ids.shape[1])
    mask = acts.attention_mask.bool() & (pos[None] >= starts[:, None])
    if not bool(mask.any(1).all()):
        raise EmptyInputError("a continuation has no tokens of its own after its context")
    out = {}
    for s in names:
        x = check_finite(acts[s].float()[mask], f"activations at {s}")
        pooled = torch.zeros(len(contexts), x.shape[1]).index_add_(0, mask.nonzero()[:, 0], x)
        out[s] = pooled / mask.sum(1, keepdim=True)
    return out


def truth_probes(model: Model, pairs: Sequence[dict[str, str]], sites: Sequence[str], *, cv: int = 5,
                 seed: int = 0, batch_size: int = 8) -> ProbeTable:
    """One probe per site separating contradicting (label 1) from consistent (0) continuations; grouped CV."""
    if isinstance(pairs, (str, dict)) or not isinstance(pairs, Sequence) or not pairs:
        raise EmptyInputError("pairs is empty; give dicts with context, consistent and contradicting texts")
    missing = [i for i, p in enumerate(pairs) if not {"context", "consistent", "contradicting"} <= set(p)]
    if missing:
        raise ArgumentError(f"pairs {missing[:5]} lack one of the keys context, consistent, contradicting")
    if len(pairs) < 2:
        raise ArgumentError(f"grouped cross-validation needs at least 2 pairs, got {len(pairs)}")
    ctx = [p["context"] for p in pairs] * 2
    cont = [p["consistent"] for p in pairs] + [p["contradicting"] for p in pairs]
    feats = continuation_features(model, ctx, cont, sites, batch_size=batch_size)
    y = np.r_[np.zeros(len(pairs), int), np.ones(len(pairs), int)]
    groups = np.r_[np.arange(len(pairs)), np.arange(len(pairs))]
    return ProbeTable(train_probe(X, y, cv=min(cv, len(pairs)), seed=seed, groups=groups, site=s, pooling="continuation")
                      for s, X in feats.items())


def _words(text: str) -> list[tuple[str, bool]]:
    """(token, starts a sentence) for the words and numbers of `text`."""
    out, start = [], True
    for tok in _TOKEN.findall(text):
        if tok in ".!?":
            start = True
            continue
        out.append((tok, start))
        start = False
    return out


def invented_facts(prompt: str, continuation: str) -> list[str]:
    """Numbers and mid-sentence capitalised words of `continuation` that do not occur in `prompt`."""
    known = {w.lower() for w, _ in _words(prompt)}
    found = []
    for w, start in _words(continuation):
        number = w[0].isdigit() or w.lower() in NUMBER_WORDS
        name = w[0].isupper() and not start and w != "I"
        if (number or name) and w.lower() not in known:
            found.append(w)
    return found


def invention_scores(prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
    """1.0 per continuation that invents at least one fact (see `invented_facts`), else 0.0."""
    if len(prompts) != len(continuations) or not all(isinstance(c, str) for c in continuations):
        raise ShapeMismatchError(f"{len(prompts)} prompts but {len(continuations)} continuations; give one string each")
    return [float(bool(invented_facts(p, c))) for p, c in zip(prompts, continuations, strict=True)]


def steer_with_probe(model: Model, probe: Probe, prompts: Sequence[str], strengths: Sequence[float], *,
                     unit_texts: Sequence[str] | None = None, max_new_tokens: int = 24, **kw: Any) -> Table:
    """Greedy generations at each strength of the probe direction (units: the site's median token norm over
    `unit_texts`, default the prompts), scored by `invention_scores` (column `invents`)."""
    prompts = _check_texts(prompts, "prompts")
    unit = site_unit(model, probe.site, list(unit_texts or prompts))
    spec = SteeringSpec([VectorSteer(probe.direction, probe.site, "add", 0.0, unit=unit, name="truth")])
    return sweep(model, prompts, spec, strengths, scores={"invents": invention_scores},
                 max_new_tokens=max_new_tokens, **kw)


def truth_data() -> list[dict[str, str]]:
    """The 40 hand-written (context, consistent, contradicting) triples."""
    from toolkit.analysis.recipes._data import load_data

    return load_data("truth")["pairs"]
