"""What an SAE feature is: its firing on a prompt, its top contexts in a corpus, its density, its logit lens."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from toolkit.errors import check_finite
from toolkit.sae.sae import SAE
from toolkit.tracing import capture, iter_capture

if TYPE_CHECKING:
    from toolkit.models import Model


@dataclass(frozen=True)
class FeatureHit:
    """One feature's firing on a prompt: strongest activation, where, and how often it fired."""

    feature: int
    max_activation: float
    token: str
    position: int
    n_active: int


class _Table(list):
    """A list that renders as an HTML table in Jupyter."""

    columns: tuple[str, ...] = ()

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(getattr(r, c)))}</td>" for c in self.columns) + "</tr>"
                       for r in self)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class FeatureTable(_Table):
    columns = ("feature", "max_activation", "token", "position", "n_active")


def _tokens(model: Model, ids: torch.Tensor) -> list[str]:
    return [model.tokenizer.decode([int(t)]) for t in ids]


def top_features(sae: SAE, model: Model, prompt: str, *, k: int = 10, site: str | None = None,
                 exclude_bos: bool = True) -> FeatureTable:
    """The k features with the largest activation anywhere in `prompt` (BOS excluded by default)."""
    s = sae.check_compatible(model, site)
    acts = capture(model, prompt, s)
    ids = acts.input_ids[0]
    x = check_finite(acts[s][0], f"activations at {s.name}")
    with torch.no_grad():
        codes = check_finite(sae.encode(x.to(sae.device)).float().cpu(), f"SAE codes at {s.name}")
    if exclude_bos:
        codes[ids == model.bos_token_id] = 0
    best, where = codes.max(0)
    order = best.argsort(descending=True)[:k]
    toks = _tokens(model, ids)
    return FeatureTable(
        FeatureHit(int(f), float(best[f]), toks[int(where[f])], int(where[f]), int((codes[:, f] > 0).sum()))
        for f in order if best[f] > 0
    )


@dataclass(frozen=True)
class Context:
    """A corpus window around a token where a feature fired."""

    activation: float
    tokens: tuple[str, ...]
    index: int
    """Position of the firing token inside `tokens`."""
    context_id: int
    position: int

    @property
    def text(self) -> str:
        """The window with the firing token in [[double brackets]]."""
        return "".join(f"[[{t}]]" if i == self.index else t for i, t in enumerate(self.tokens))

    def _repr_html_(self) -> str:
        parts = [f"<b style='background:#ffd54f'>{html.escape(t)}</b>" if i == self.index else html.escape(t)
                 for i, t in enumerate(self.tokens)]
        return f"<code>{self.activation:.2f}</code> " + "".join(parts)


def top_contexts(sae: SAE, model: Model, contexts: torch.Tensor, features: int | Sequence[int], *, k: int = 5,
                 window: tuple[int, int] = (10, 3), site: str | None = None, batch_size: int = 8,
                 progress: bool = True) -> dict[int, list[Context]]:
    """Top-k activating token windows per feature over a corpus of token contexts (BOS excluded)."""
    feats = [sae.check_feature(features)] if isinstance(features, int) else [sae.check_feature(f) for f in features]
    s = sae.check_compatible(model, site)
    best_val = torch.full((len(feats), k), -float("inf"))
    best_loc = torch.zeros((len(feats), k, 2), dtype=torch.long)
    for offset, acts in iter_capture(model, contexts, s, batch_size=batch_size, progress=progress,
                                     desc=f"top contexts of {len(feats)} features"):
        x = check_finite(acts[s.name], f"activations at {s.name} (contexts {offset}..{offset + len(acts[s.name]) - 1})")
        ids = contexts[offset:offset + x.shape[0]]
        with torch.no_grad():
            codes = sae.encode(x.to(sae.device)).float().cpu()[..., feats]  # (b, ctx, n_feats)
        check_finite(codes, f"SAE codes at {s.name}")
        codes[ids == model.bos_token_id] = -float("inf")
        flat = codes.reshape(-1, len(feats)).T  # (n_feats, b*ctx)
        kk = min(k, flat.shape[1])
        vals, idx = flat.topk(kk, dim=1)
        loc = torch.stack([idx // x.shape[1] + offset, idx % x.shape[1]], -1)
        all_vals = torch.cat([best_val, vals], 1)
        all_loc = torch.cat([best_loc, loc], 1)
        best_val, keep = all_vals.topk(k, dim=1)
        best_loc = all_loc.gather(1, keep[..., None].expand(-1, -1, 2))
    out: dict[int, list[Context]] = {}
    before, after = window
    for i, f in enumerate(feats):
        hits = []
        for v, (c, p) in zip(best_val[i].tolist(), best_loc[i].tolist(), strict=True):
            if v <= 0:
                continue
            lo, hi = max(1, p - before), min(contexts.shape[1], p + after + 1)
            hits.append(Context(float(v), tuple(_tokens(model, contexts[c, lo:hi])), p - lo, c, p))
        out[f] = hits
    return out


def feature_density(sae: SAE, model: Model, contexts: torch.Tensor, *, site: str | None = None,
                    batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Fraction of (non-BOS) tokens on which each feature fires, shape (d_sae,)."""
    s = sae.check_compatible(model, site)
    fires = torch.zeros(sae.d_sae, dtype=torch.float64)
    n = 0
    for offset, acts in iter_capture(model, contexts, s, batch_size=batch_size, progress=progress, desc="density"):
        x = check_finite(acts[s.name], f"activations at {s.name} (contexts {offset}..{offset + len(acts[s.name]) - 1})")
        keep = contexts[offset:offset + x.shape[0]] != model.bos_token_id
        with torch.no_grad():
            codes = check_finite(sae.encode(x[keep].to(sae.device)), f"SAE codes at {s.name}")
        fires += (codes != 0).sum(0).double().cpu()
        n += int(keep.sum())
    return fires / max(n, 1)


def logit_lens_ids(sae: SAE, model: Model, features: Sequence[int] | None = None, *, k: int = 10,
                   latent_chunk: int = 512, vocab_chunk: int = 16384) -> tuple[torch.Tensor, ...]:
    """Top-k promoted and suppressed token ids and scores for many features at once (all when `features` is None).

    Returns (promoted_ids, promoted_scores, suppressed_ids, suppressed_scores), each (n_features, k); suppressed
    scores are the (negative) raw scores. Chunked over latents and vocabulary, so no (n, vocab) matrix is held.
    """
    feats = torch.arange(sae.d_sae) if features is None else torch.tensor([sae.check_feature(f) for f in features],
                                                                           dtype=torch.long)
    W_U = model.hf.get_output_embeddings().weight  # (vocab, d_model)
    vocab = W_U.shape[0]
    k = min(k, vocab)
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    with torch.no_grad():
        for lo in range(0, len(feats), latent_chunk):
            dirs = (sae.W_dec[feats[lo:lo + latent_chunk]] / sae.input_scale).float().to(W_U.device)
            best = [torch.full((len(dirs), 0), 0.0), torch.zeros((len(dirs), 0), dtype=torch.long)] * 2
            for v0 in range(0, vocab, vocab_chunk):
                scores = (dirs @ W_U[v0:v0 + vocab_chunk].float().T).cpu()  # (chunk, vchunk)
                for j, sign in ((0, 1.0), (2, -1.0)):  # the chunk's own top k first: no (chunk, vchunk) copies
                    top, where = scores.topk(min(k, scores.shape[1]), dim=1, largest=sign > 0)
                    vals = torch.cat([best[j], sign * top], 1)
                    ids = torch.cat([best[j + 1], where + v0], 1)
                    top, where = vals.topk(min(k, vals.shape[1]), dim=1)
                    best[j], best[j + 1] = top, ids.gather(1, where)
            for o, t in zip(outs, (best[1], best[0], best[3], -best[2]), strict=True):
                o.append(t)
    return tuple(torch.cat(o) for o in outs)


def logit_lens(sae: SAE, model: Model, feature: int, *, k: int = 10) -> dict[str, list[tuple[str, float]]]:
    """Tokens whose unembedding aligns most (and least) with the feature's decoder direction."""
    up_ids, up, down_ids, down = logit_lens_ids(sae, model, [feature], k=k)
    dec = model.tokenizer.decode
    return {"promoted": [(dec([int(i)]), float(v)) for v, i in zip(up[0], up_ids[0], strict=True)],
            "suppressed": [(dec([int(i)]), float(v)) for v, i in zip(down[0], down_ids[0], strict=True)]}
