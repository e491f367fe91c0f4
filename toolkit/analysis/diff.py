"""Crosscoder model diff: which latents belong to the base model, to the fine-tune, or to both, and which
"fine-tune-only" latents are sparsity artifacts (Latent Scaling, "Overcoming Sparsity Artifacts in Crosscoders").

Decoder norms. For latent j with decoder directions d_j^base, d_j^ft (normalized units):
    norm_diff_j     = ((|d_ft| - |d_base|) / max(|d_ft|, |d_base|) + 1) / 2     the paper's relative norm difference
    relative_norm_j = |d_ft| / (|d_base| + |d_ft|)                               Anthropic's ratio
Both are 0 for a base-only latent, 1/2 for an equally shared one and 1 for a fine-tune-only one. Classes (by
norm_diff, the paper's bands): 'base-only' <= 0.1, 'ft-only' >= 0.9, 'shared' within 0.5 +- 0.1, else 'other'.
A fine-tune can also keep a concept and change what it writes: such a latent stays 'shared' (or 'other') with
a lower cosine between its two decoder directions (`cosine`) and a norm_diff pulled towards one side.

Latent Scaling. beta = argmin_b E|y - b f_j(x) d_j|^2 = E[f_j <y, d_j>] / (E[f_j^2] |d_j|^2), with d_j the
fine-tune's decoder direction, for two targets y in each model m:
    error  eps_m = x_m - (recon_m - f_j d_j^m)     what model m's reconstruction misses without latent j
    recon  r_m   = recon_m                          what the other latents (and j) reconstruct
nu_eps = beta^eps_base / beta^eps_ft and nu_r = beta^r_base / beta^r_ft. Near 0: the latent really is specific
to the fine-tune. A large nu_eps means the base activations need the latent too but its base decoder was
shrunk away (Complete Shrinkage); a large nu_r means the base model carries it through other latents (Latent
Decoupling). A 'ft-only' latent with either ratio above `artifact_threshold` is flagged as an artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.crosscoder import Crosscoder, PairedActivations
from toolkit.crosscoder.crosscoder import finite_source
from toolkit.errors import check_index, check_positive_int

if TYPE_CHECKING:
    from toolkit.models import Model

CLASSES = ("base-only", "shared", "ft-only", "other")


def norm_diff(cc: Crosscoder) -> np.ndarray:
    """(d_sae,) the paper's relative decoder-norm difference in [0, 1] (0 base-only, 0.5 shared, 1 ft-only)."""
    n = cc.decoder_norms().double()
    return (((n[:, 1] - n[:, 0]) / n.max(dim=1).values.clamp_min(1e-12) + 1) / 2).numpy()


def relative_norm(cc: Crosscoder) -> np.ndarray:
    """(d_sae,) |d_ft| / (|d_base| + |d_ft|)."""
    n = cc.decoder_norms().double()
    return (n[:, 1] / n.sum(dim=1).clamp_min(1e-12)).numpy()


def decoder_cosine(cc: Crosscoder) -> np.ndarray:
    """(d_sae,) cosine between each latent's base and fine-tuned decoder directions (NaN if one is zero)."""
    W = cc.W_dec.detach().double()
    n = W.norm(dim=-1)
    cos = (W[:, 0] * W[:, 1]).sum(-1) / (n[:, 0] * n[:, 1])
    return torch.where((n > 0).all(-1), cos, torch.full_like(cos, float("nan"))).numpy()


def classify(nd: np.ndarray, *, only: float = 0.1, shared: float = 0.1) -> np.ndarray:
    """Class of each latent from its norm_diff: 'base-only' <= only, 'ft-only' >= 1 - only,
    'shared' within 0.5 +- shared, else 'other'."""
    nd = np.asarray(nd)
    out = np.full(nd.shape, "other", dtype=object)
    out[np.abs(nd - 0.5) <= shared] = "shared"
    out[nd <= only] = "base-only"
    out[nd >= 1 - only] = "ft-only"
    return out


@dataclass
class LatentScaling:
    """Latent Scaling betas (see the module docstring) for each latent; NaN where the latent never fires."""

    beta_error: np.ndarray
    """(d_sae, 2) beta^eps for the base ([:, 0]) and fine-tuned ([:, 1]) model."""
    beta_recon: np.ndarray
    """(d_sae, 2) beta^r for the base and fine-tuned model."""
    specific: str
    """'ft': betas along the fine-tune's decoder, ratios base / ft; 'base': the reverse."""

    @property
    def nu_error(self) -> np.ndarray:
        a, b = (0, 1) if self.specific == "ft" else (1, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.beta_error[:, a] / self.beta_error[:, b]

    @property
    def nu_recon(self) -> np.ndarray:
        a, b = (0, 1) if self.specific == "ft" else (1, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.beta_recon[:, a] / self.beta_recon[:, b]


@torch.no_grad()
def latent_scaling(cc: Crosscoder, acts: PairedActivations | torch.Tensor, *, specific: str = "ft",
                   batch_size: int = 2048) -> LatentScaling:
    """Closed-form Latent Scaling of every latent over `acts`, in the crosscoder's normalized units."""
    check_positive_int(batch_size, "batch_size")
    if specific not in ("ft", "base"):
        raise ValueError(f"specific must be 'ft' or 'base', got {specific!r}")
    if isinstance(acts, PairedActivations):
        cc.check_source(acts.models, acts.site, acts.d)
    data = finite_source(acts)
    was = cc.training
    cc.eval()
    W = cc.W_dec.double()
    D = W[:, 1 if specific == "ft" else 0]  # (S, d) the direction each beta scales
    own = torch.stack([(W[:, 0] * D).sum(-1), (W[:, 1] * D).sum(-1)], dim=1)  # <d_j^m, d_j>
    num_err, num_rec = torch.zeros(cc.d_sae, 2, dtype=torch.float64), torch.zeros(cc.d_sae, 2, dtype=torch.float64)
    f2 = torch.zeros(cc.d_sae, dtype=torch.float64)
    for i in range(0, data.shape[0], batch_size):
        xn = cc.normalize(data[i:i + batch_size].to(cc.device)).double()
        f = cc.activate(cc.pre_activations(xn.to(cc.dtype))).double()
        recon = (f @ W.reshape(cc.d_sae, 2 * cc.d_in)).view(-1, 2, cc.d_in) + cc.b_dec.double()
        for m in range(2):
            num_err[:, m] += (f * ((xn[:, m] - recon[:, m]) @ D.T)).sum(0)
            num_rec[:, m] += (f * (recon[:, m] @ D.T)).sum(0)
        f2 += f.pow(2).sum(0)
    cc.train(was)
    num_err += f2[:, None] * own  # add latent j's own contribution back: eps_m = x_m - (recon_m - f_j d_j^m)
    den = (f2 * D.pow(2).sum(-1))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return LatentScaling((num_err / den).numpy(), (num_rec / den).numpy(), specific)


@dataclass
class DiffTable:
    """Per-latent model-diff facts; arrays are indexed by latent."""

    norms: np.ndarray
    """(d_sae, 2) decoder norms (base, fine-tuned)."""
    norm_diff: np.ndarray
    relative_norm: np.ndarray
    cls: np.ndarray
    """'base-only', 'shared', 'ft-only' or 'other' (see classify)."""
    cosine: np.ndarray
    """Cosine between the base and fine-tuned decoder directions."""
    freq: np.ndarray
    """Fraction of tokens on which the latent fires (NaN without activations)."""
    scaling: LatentScaling | None
    artifact: np.ndarray
    """'ft-only' latents whose nu_eps or nu_r exceeds the artifact threshold (False without activations)."""

    def __len__(self) -> int:
        return len(self.norm_diff)

    @property
    def nu_error(self) -> np.ndarray:
        return self.scaling.nu_error if self.scaling is not None else np.full(len(self), np.nan)

    @property
    def nu_recon(self) -> np.ndarray:
        return self.scaling.nu_recon if self.scaling is not None else np.full(len(self), np.nan)

    def indices(self, kind: str) -> np.ndarray:
        """Latents of one class."""
        if kind not in CLASSES:
            raise ValueError(f"unknown class {kind!r}; valid: {', '.join(CLASSES)}")
        return np.nonzero(self.cls == kind)[0]

    def counts(self) -> dict[str, int]:
        """Number of latents per class, and of flagged artifacts."""
        return {**{c: int((self.cls == c).sum()) for c in CLASSES}, "artifact": int(self.artifact.sum())}

    def row(self, j: int) -> dict[str, Any]:
        """Everything known about latent j."""
        j = check_index(j, len(self), "latent index")
        return {"latent": int(j), "class": self.cls[j], "norm_diff": float(self.norm_diff[j]),
                "relative_norm": float(self.relative_norm[j]), "cosine": float(self.cosine[j]),
                "norm_base": float(self.norms[j, 0]),
                "norm_ft": float(self.norms[j, 1]), "freq": float(self.freq[j]), "nu_error": float(self.nu_error[j]),
                "nu_recon": float(self.nu_recon[j]), "artifact": bool(self.artifact[j])}


def diff_table(cc: Crosscoder, acts: PairedActivations | torch.Tensor | None = None, *, only: float = 0.1,
               shared: float = 0.1, artifact_threshold: float = 0.5, batch_size: int = 2048) -> DiffTable:
    """Decoder-norm classes for every latent, plus frequency and Latent Scaling when `acts` is given."""
    check_positive_int(batch_size, "batch_size")
    nd = norm_diff(cc)
    cls = classify(nd, only=only, shared=shared)
    freq = np.full(cc.d_sae, np.nan)
    scaling = None
    artifact = np.zeros(cc.d_sae, dtype=bool)
    if acts is not None:
        scaling = latent_scaling(cc, acts, batch_size=batch_size)
        data = acts.acts if isinstance(acts, PairedActivations) else acts
        fired = torch.zeros(cc.d_sae, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, data.shape[0], batch_size):
                fired += (cc.encode(data[i:i + batch_size].to(cc.device)) > 0).sum(0).double().cpu()
        freq = (fired / max(data.shape[0], 1)).numpy()
        with np.errstate(invalid="ignore"):
            artifact = (cls == "ft-only") & ((scaling.nu_error > artifact_threshold)
                                             | (scaling.nu_recon > artifact_threshold))
    return DiffTable(cc.decoder_norms().double().numpy(), nd, relative_norm(cc), cls, decoder_cosine(cc), freq,
                     scaling, artifact)


def top_latents(table: DiffTable, n: int = 10, *, kind: str | None = "ft-only", by: str = "freq",
                min_freq: float = 0.0, exclude_artifacts: bool = True) -> list[int]:
    """The `n` latents of class `kind` (None: any class) ranked by `by`: 'freq' (most often firing first),
    'norm_diff' (most fine-tune-leaning first; for kind='base-only' most base-leaning first), 'cosine' (most
    changed decoder first) or 'nu' (lowest nu_eps + nu_r first)."""
    idx = np.arange(len(table)) if kind is None else table.indices(kind)
    keep = np.ones(len(idx), dtype=bool)
    if min_freq > 0:
        keep &= np.nan_to_num(table.freq[idx], nan=0.0) >= min_freq
    if exclude_artifacts:
        keep &= ~table.artifact[idx]
    idx = idx[keep]
    if by == "freq":
        key = -np.nan_to_num(table.freq[idx], nan=-1.0)
    elif by == "norm_diff":
        key = table.norm_diff[idx] if kind == "base-only" else -table.norm_diff[idx]
    elif by == "cosine":
        key = np.nan_to_num(table.cosine[idx], nan=np.inf)
    elif by == "nu":
        key = np.nan_to_num(np.abs(table.nu_error[idx]) + np.abs(table.nu_recon[idx]), nan=np.inf)
    else:
        raise ValueError(f"by must be 'freq', 'norm_diff', 'cosine' or 'nu', got {by!r}")
    return [int(j) for j in idx[np.argsort(key, kind="stable")][:n]]


@torch.no_grad()
def decoder_lens(cc: Crosscoder, model: Model, latent: int, *, which: str = "diff", k: int = 8) -> list[tuple[str, float]]:
    """Tokens the latent's decoder direction promotes most through the model's final norm and unembedding
    (a logit lens): which='base', 'ft', or 'diff' (fine-tuned minus base direction: what fine-tuning added)."""
    latent = check_index(latent, cc.d_sae, "latent index", cc.name)
    if which not in ("base", "ft", "diff"):
        raise ValueError(f"which must be 'base', 'ft' or 'diff', got {which!r}")
    d = cc.W_dec[int(latent)] / cc.input_scale[:, None]  # (2, d_in) in raw units
    v = {"base": d[0], "ft": d[1], "diff": d[1] - d[0]}[which]
    W_U = model.hf.get_output_embeddings().weight
    norm = getattr(model.hf.model, "norm", None)
    if norm is not None:  # Gemma's RMSNorm scales by (1 + weight); its 1/rms only rescales every logit alike
        v = v.to(norm.weight.dtype) * (1 + norm.weight.to(v.device))
    scores = (W_U @ v.to(W_U.device, W_U.dtype)).float().cpu()
    top = scores.topk(k)
    return [(model.tokenizer.decode([int(i)]), float(x)) for x, i in zip(top.values, top.indices, strict=True)]


@dataclass
class LatentContext:
    """One top-activating token of a latent, with the text around it."""

    activation: float
    context: int
    """Row in acts.tokens."""
    position: int
    token: str
    text: str
    """The surrounding text with the token marked as «token»."""


@torch.no_grad()
def latent_activations(cc: Crosscoder, acts: PairedActivations, latent: int, *, batch_size: int = 2048) -> torch.Tensor:
    """(n,) activation of one latent on every row of `acts`."""
    latent = check_index(latent, cc.d_sae, "latent index", cc.name)
    check_positive_int(batch_size, "batch_size")
    finite_source(acts)
    return torch.cat([cc.encode(acts.acts[i:i + batch_size].to(cc.device))[:, int(latent)].cpu()
                      for i in range(0, len(acts), batch_size)]) if len(acts) else torch.zeros(0)


def latent_contexts(cc: Crosscoder, acts: PairedActivations, latent: int, tokenizer: Any, *, k: int = 10,
                    window: int = 12) -> list[LatentContext]:
    """The `k` tokens on which `latent` fires most, each with `window` tokens of context before it."""
    if acts.tokens is None or acts.positions is None:
        raise ValueError("latent_contexts needs acts.tokens and acts.positions (use capture_pair or from_caches "
                         "with tokens=...)")
    a = latent_activations(cc, acts, latent)
    out = []
    for i in a.topk(min(k, len(a))).indices.tolist():
        if a[i] <= 0:
            break
        c, p = (int(v) for v in acts.positions[i])
        row = acts.tokens[c].tolist()
        tok = tokenizer.decode([row[p]])
        before = tokenizer.decode(row[max(0, p - window):p], skip_special_tokens=True)
        after = tokenizer.decode(row[p + 1:p + 4], skip_special_tokens=True)
        out.append(LatentContext(float(a[i]), c, p, tok, f"{before}«{tok}»{after}".replace("\n", "⏎")))
    return out


def share_of_contexts(contexts: Sequence[LatentContext], mask: torch.Tensor) -> float:
    """Fraction of `contexts` whose (context, position) is True in `mask` (n_contexts, ctx_len)."""
    if not contexts:
        return 0.0
    return sum(bool(mask[c.context, c.position]) for c in contexts) / len(contexts)
