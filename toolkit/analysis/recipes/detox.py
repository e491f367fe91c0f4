"""SAE detoxification ("Breaking Bad Tokens", Goyal et al. 2025): find latents tied to hostile text by the mean
activation difference between contrastive sets, check their top tokens, and steer them in three tiers.

Tiers (`LatentEdit` modes), least to most aggressive: `zero` (conditional ablation where active), `negative`
(clamp to -c where active), `subtract` (constant subtraction of s x decoder row at every position). Scores: the
share of continuations with a word from a written lexicon of mild profanity and insults (our stand-in for a
toxicity classifier: no offline one ships its model), and fluency as the unsteered model's per-token NLL of the
continuation. A random-latent control gets the same edit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.analysis.judge import continuation_nll
from toolkit.analysis.table import Table
from toolkit.errors import ArgumentError, EmptyInputError, check_finite
from toolkit.tracing import capture
from toolkit.tracing.hooked import generate_hooked
from toolkit.tracing.intervene import Edit

if TYPE_CHECKING:
    from toolkit.models import Model
    from toolkit.sae.sae import SAE

_WORD = re.compile(r"[a-z]+")


def _codes(model: Model, sae: SAE, texts: Sequence[str]) -> tuple[torch.Tensor, Any]:
    if isinstance(texts, str) or not texts:
        raise EmptyInputError("texts is empty; give a list of sentences")
    s = sae.check_compatible(model).name
    acts = capture(model, list(texts), s, truncate=True)
    keep = acts.attention_mask.bool() & (acts.input_ids != model.bos_token_id)
    with torch.no_grad():
        codes = sae.encode(acts[s].to(sae.device, sae.dtype)).float().cpu()
    check_finite(codes[keep], f"SAE codes at {s}")
    return codes, (keep, acts.input_ids)


def contrast_latents(model: Model, sae: SAE, unwanted: Sequence[str], other: Sequence[str], *, k: int = 5) -> list[int]:
    """The `k` latents whose mean token activation is highest on `unwanted` relative to `other`."""
    if k < 1 or k > sae.d_sae:
        raise ArgumentError(f"k must be in 1..{sae.d_sae}, got {k}")
    (cu, (ku, _)), (co, (ko, _)) = _codes(model, sae, unwanted), _codes(model, sae, other)
    diff = cu[ku].mean(0) - co[ko].mean(0)
    return [int(i) for i in diff.topk(k).indices]


def latent_tokens(model: Model, sae: SAE, latent: int, texts: Sequence[str], *, k: int = 8) -> list[tuple[str, float]]:
    """The `k` tokens of `texts` where `latent` is most active, with the activation (its contexts, in brief)."""
    latent = sae.check_feature(latent)
    codes, (keep, ids) = _codes(model, sae, texts)
    vals = codes[..., latent].masked_fill(~keep, -1.0).flatten()
    top = vals.topk(min(k, int(keep.sum())))
    return [(model.tokenizer.decode([int(ids.flatten()[i])]), float(v)) for v, i in zip(top.values, top.indices, strict=True)
            if v > 0]


def unwanted_rate(texts: Sequence[str], lexicon: Sequence[str]) -> float:
    """Share of `texts` holding at least one lexicon word (case-insensitive, whole words)."""
    lex = {w.lower() for w in lexicon}
    if not lex:
        raise EmptyInputError("the lexicon is empty")
    if not texts:
        raise EmptyInputError("texts is empty")
    return float(np.mean([bool(lex & set(_WORD.findall(t.lower()))) for t in texts]))


def detox_table(model: Model, prompts: Sequence[str], conditions: Mapping[str, Sequence[Edit]],
                lexicon: Sequence[str], *, max_new_tokens: int = 20, seed: int = 0, samples: int = 1) -> Table:
    """Per condition: the unwanted rate and the mean NLL (unsteered model) of sampled continuations
    (`samples` per prompt, temperature 1, fixed seed), plus two examples."""
    if not conditions:
        raise EmptyInputError("conditions is empty; give {name: [edits]} (an empty list is the baseline)")
    prompts = list(prompts) * samples
    rows = []
    for name, edits in conditions.items():
        gens = generate_hooked(model, prompts, list(edits), max_new_tokens=max_new_tokens, do_sample=True, seed=seed)
        nll = [n for n in continuation_nll(model, prompts, gens) if np.isfinite(n)]
        rows.append({"condition": name, "unwanted": unwanted_rate(gens, lexicon),
                     "nll": float(np.mean(nll)) if nll else float("inf"), "example": gens[0]})
    return Table(rows, ["condition", "unwanted", "nll", "example"])


def detox_data() -> dict[str, Any]:
    """The hand-written contrastive sets, prompts and lexicon."""
    from toolkit.analysis.recipes._data import load_data

    return load_data("detox")
