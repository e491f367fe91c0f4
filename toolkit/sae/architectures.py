"""SAE architectures: how each turns encoder pre-activations into codes, registered by name.

An architecture is a small stateless object. `activate(sae, pre)` is its specification in plain torch;
`encode(sae, x)` is the hot path and may use a fused kernel from `toolkit.kernels` (same result; the kernels
pick Triton or torch per call from the tensors' device).
Register a new one with `register(MyArch())`; a second architecture with the same name is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

import torch
import torch.nn.functional as F

import toolkit.kernels as kernels
from toolkit.config import SAE_ARCHITECTURES

if TYPE_CHECKING:
    from toolkit.sae.sae import SAE

Budget = Union[int, torch.Tensor, None]
"""Active latents per token: None (the architecture's default), an int, or an int64 tensor (N,) of one per row."""


# ---------------------------------------------------------------- architectures


def pre_activations(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """x @ W_enc + b_enc for prepared inputs (N, d_in), rounded as the torch kernel twin rounds it (addmm)."""
    return torch.addmm(sae.b_enc, x, sae.W_enc)


class Architecture:
    """Base class: subclasses set `name` and override `activate` (and `encode` when a kernel fuses it).

    `k` in the methods below is None for architectures that do not take a budget; for those that do
    (`takes_k`), the SAE passes a checked budget: an int in 1..cfg.k, or an int64 tensor (N,) of one per row."""

    name: str = ""
    needs_k: bool = False
    has_groups: bool = False
    takes_k: bool = False  # encode(x, k=...) chooses the number of active latents per token at inference
    extra_fields: tuple[str, ...] = ()  # further SAEConfig fields it needs (e.g. adaptivek's k_min)
    has_probe: bool = False  # holds a complexity probe (probe_weight, probe_bias) that sets k per input
    threshold: str | None = None  # None, "latent" (one per latent, learned) or "scalar" (estimated in training)

    def activate(self, sae: SAE, pre: torch.Tensor, k: Budget = None) -> torch.Tensor:
        """Codes from pre-activations `pre` (N, d_sae): the specification of this architecture."""
        raise NotImplementedError

    def encode(self, sae: SAE, x: torch.Tensor, k: Budget = None) -> torch.Tensor:
        """Codes from prepared inputs `x` (N, d_in); equal to `activate(sae, pre_activations(sae, x), k)`."""
        pre = pre_activations(sae, x)
        return self.activate(sae, pre) if k is None else self.activate(sae, pre, k)  # user archs may not take k

    def encode_sparse(self, sae: SAE, x: torch.Tensor, k: Budget = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values), each (N, kmax), of the nonzero codes; padding is index 0 with value 0."""
        return kernels.to_sparse(self.encode(sae, x) if k is None else self.encode(sae, x, k))

    def default_budget(self, sae: SAE, x: torch.Tensor) -> Budget:
        """The budget used when encode is given none (prepared inputs x): cfg.k for the top-k family."""
        return sae.cfg.k if self.takes_k else None

    def __repr__(self) -> str:
        return f"<architecture {self.name!r}>"


class ReLU(Architecture):
    """Standard SAE: codes = relu(pre)."""

    name = "relu"

    def activate(self, sae: SAE, pre: torch.Tensor, k: Budget = None) -> torch.Tensor:
        return F.relu(pre)

    def encode(self, sae: SAE, x: torch.Tensor, k: Budget = None) -> torch.Tensor:
        return kernels.encode(x, sae.W_enc, sae.b_enc, activation="relu")


class JumpReLU(Architecture):
    """JumpReLU (Gemma Scope): codes = relu(pre) * (pre > threshold), one learned threshold per latent."""

    name = "jumprelu"
    threshold = "latent"

    def activate(self, sae: SAE, pre: torch.Tensor, k: Budget = None) -> torch.Tensor:
        return F.relu(pre) * (pre > sae.threshold)

    def encode(self, sae: SAE, x: torch.Tensor, k: Budget = None) -> torch.Tensor:
        return kernels.encode(x, sae.W_enc, sae.b_enc, activation="jumprelu", threshold=sae.threshold)


class TopK(Architecture):
    """TopK: the k largest pre-activations of each token, relu'd; exactly k (or fewer positive) per token.

    `encode(x, k=k')` with k' < cfg.k keeps the k' largest only (a TopK SAE truncated to a smaller budget)."""

    name = "topk"
    needs_k = True
    takes_k = True

    def activate(self, sae: SAE, pre: torch.Tensor, k: Budget = None) -> torch.Tensor:
        k = sae.cfg.k if k is None else k
        if isinstance(k, torch.Tensor):
            values, indices = ranked_topk(pre, k)
            return torch.zeros_like(pre).scatter(-1, indices, values)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))

    def encode(self, sae: SAE, x: torch.Tensor, k: Budget = None) -> torch.Tensor:
        k = sae.cfg.k if k is None else k
        if isinstance(k, torch.Tensor):
            return self.activate(sae, pre_activations(sae, x), k)
        return kernels.encode(x, sae.W_enc, sae.b_enc, activation="topk", k=k)

    def encode_sparse(self, sae: SAE, x: torch.Tensor, k: Budget = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = sae.cfg.k if k is None else k
        if isinstance(k, torch.Tensor):
            values, indices = ranked_topk(pre_activations(sae, x), k)
            return indices.masked_fill(values == 0, 0), values
        values, indices = kernels.encode_topk(x, sae.W_enc, sae.b_enc, k)
        return indices, values


def ranked_topk(pre: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row budgets k (N,): (values, indices), each (N, max k), of each row's largest pre-activations in
    descending order, relu'd, with the entries past the row's own k set to 0."""
    kmax = int(k.max()) if k.numel() else 1
    values, indices = pre.topk(min(kmax, pre.shape[-1]), dim=-1, sorted=True)
    keep = torch.arange(values.shape[-1], device=pre.device) < k[:, None]
    return F.relu(values) * keep, indices


class BatchTopK(Architecture):
    """BatchTopK: in training mode the k * n_tokens largest relu'd pre-activations of the whole batch survive.

    At inference (eval mode) each token is encoded alone: relu(pre) * (pre > threshold) with the single scalar
    threshold estimated during training (BatchTopK paper). While that threshold is unset (negative; -1 at
    init) inference falls back to per-token top-k, so an untrained or freshly converted SAE still has L0 = k.
    """

    name = "batchtopk"
    needs_k = True
    threshold = "scalar"

    def activate(self, sae: SAE, pre: torch.Tensor, k: Budget = None) -> torch.Tensor:
        if sae.training:
            acts = F.relu(pre)
            n = min(sae.cfg.k * acts.shape[0], acts.numel())
            values, indices = acts.flatten().topk(n, sorted=False)
            return torch.zeros_like(acts).flatten().scatter(0, indices, values).view_as(acts)
        if self.threshold_is_set(sae):
            return F.relu(pre) * (pre > sae.threshold)
        return TOPK.activate(sae, pre)

    def encode(self, sae: SAE, x: torch.Tensor, k: Budget = None) -> torch.Tensor:
        if sae.training:
            return super().encode(sae, x)
        if self.threshold_is_set(sae):
            t = sae.threshold.expand(sae.d_sae)
            return kernels.encode(x, sae.W_enc, sae.b_enc, activation="jumprelu", threshold=t.contiguous())
        return TOPK.encode(sae, x)

    @staticmethod
    def threshold_is_set(sae: SAE) -> bool:
        return bool(sae.threshold >= 0)


class Matryoshka(BatchTopK):
    """Matryoshka BatchTopK: BatchTopK codes whose nested prefixes (cfg.matryoshka_groups) each reconstruct alone.

    Encoding is BatchTopK's; the groups matter for training losses and for `sae.decode(codes, width=w)`.
    """

    name = "matryoshka"
    has_groups = True


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture under `arch.name`; a name that is already taken raises ValueError.

    Its config needs (k, matryoshka_groups) are declared in toolkit.config.SAE_ARCHITECTURES, so that
    SAEConfig validates without importing this layer; a new name is added there, a known one must agree.
    """
    if not arch.name:
        raise ValueError(f"{type(arch).__name__} has no name")
    if arch.name in ARCHITECTURES:
        raise ValueError(
            f"architecture {arch.name!r} is already registered ({type(ARCHITECTURES[arch.name]).__name__})"
        )
    fields = ("k",) * arch.needs_k + ("matryoshka_groups",) * arch.has_groups + arch.extra_fields
    declared = SAE_ARCHITECTURES.setdefault(arch.name, fields)
    if declared != fields:
        raise ValueError(f"architecture {arch.name!r} needs {fields}, but SAEConfig declares {declared}")
    ARCHITECTURES[arch.name] = arch
    return arch


def get_architecture(name: Any) -> Architecture:
    """The registered architecture called `name`; ValueError listing the valid names otherwise."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown SAE architecture {name!r}; valid: {', '.join(ARCHITECTURES)}"
        ) from None


TOPK = TopK()
for _arch in (JumpReLU(), ReLU(), TOPK, BatchTopK(), Matryoshka()):
    register(_arch)
