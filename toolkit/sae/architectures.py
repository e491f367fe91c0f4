"""SAE architectures: how each turns encoder pre-activations into codes, registered by name.

An architecture is a small stateless object. `activate(sae, pre)` is its specification in plain torch;
`encode(sae, x)` is the hot path and may use a fused kernel from `toolkit.kernels` (same result; the kernels
pick Triton or torch per call from the tensors' device).
Register a new one with `register(MyArch())`; a second architecture with the same name is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

import toolkit.kernels as kernels
from toolkit.config import SAE_ARCHITECTURES

if TYPE_CHECKING:
    from toolkit.sae.sae import SAE


# ---------------------------------------------------------------- architectures


def pre_activations(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """x @ W_enc + b_enc for prepared inputs (N, d_in), rounded as the torch kernel twin rounds it (addmm)."""
    return torch.addmm(sae.b_enc, x, sae.W_enc)


class Architecture:
    """Base class: subclasses set `name` and override `activate` (and `encode` when a kernel fuses it)."""

    name: str = ""
    needs_k: bool = False
    has_groups: bool = False
    threshold: str | None = None  # None, "latent" (one per latent, learned) or "scalar" (estimated in training)

    def activate(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        """Codes from pre-activations `pre` (N, d_sae): the specification of this architecture."""
        raise NotImplementedError

    def encode(self, sae: SAE, x: torch.Tensor) -> torch.Tensor:
        """Codes from prepared inputs `x` (N, d_in); equal to `activate(sae, pre_activations(sae, x))`."""
        return self.activate(sae, pre_activations(sae, x))

    def encode_sparse(self, sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values), each (N, kmax), of the nonzero codes; padding is index 0 with value 0."""
        return kernels.to_sparse(self.encode(sae, x))

    def __repr__(self) -> str:
        return f"<architecture {self.name!r}>"


class ReLU(Architecture):
    """Standard SAE: codes = relu(pre)."""

    name = "relu"

    def activate(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre)

    def encode(self, sae: SAE, x: torch.Tensor) -> torch.Tensor:
        return kernels.encode(x, sae.W_enc, sae.b_enc, activation="relu")


class JumpReLU(Architecture):
    """JumpReLU (Gemma Scope): codes = relu(pre) * (pre > threshold), one learned threshold per latent."""

    name = "jumprelu"
    threshold = "latent"

    def activate(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre) * (pre > sae.threshold)

    def encode(self, sae: SAE, x: torch.Tensor) -> torch.Tensor:
        return kernels.encode(x, sae.W_enc, sae.b_enc, activation="jumprelu", threshold=sae.threshold)


class TopK(Architecture):
    """TopK: the k largest pre-activations of each token, relu'd; exactly k (or fewer positive) per token."""

    name = "topk"
    needs_k = True

    def activate(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(sae.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))

    def encode(self, sae: SAE, x: torch.Tensor) -> torch.Tensor:
        return kernels.encode(x, sae.W_enc, sae.b_enc, activation="topk", k=sae.cfg.k)

    def encode_sparse(self, sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = kernels.encode_topk(x, sae.W_enc, sae.b_enc, sae.cfg.k)
        return indices, values


class BatchTopK(Architecture):
    """BatchTopK: in training mode the k * n_tokens largest relu'd pre-activations of the whole batch survive.

    At inference (eval mode) each token is encoded alone: relu(pre) * (pre > threshold) with the single scalar
    threshold estimated during training (BatchTopK paper). While that threshold is unset (negative; -1 at
    init) inference falls back to per-token top-k, so an untrained or freshly converted SAE still has L0 = k.
    """

    name = "batchtopk"
    needs_k = True
    threshold = "scalar"

    def activate(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        if sae.training:
            acts = F.relu(pre)
            n = min(sae.cfg.k * acts.shape[0], acts.numel())
            values, indices = acts.flatten().topk(n, sorted=False)
            return torch.zeros_like(acts).flatten().scatter(0, indices, values).view_as(acts)
        if self.threshold_is_set(sae):
            return F.relu(pre) * (pre > sae.threshold)
        return TOPK.activate(sae, pre)

    def encode(self, sae: SAE, x: torch.Tensor) -> torch.Tensor:
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
    fields = ("k",) * arch.needs_k + ("matryoshka_groups",) * arch.has_groups
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
