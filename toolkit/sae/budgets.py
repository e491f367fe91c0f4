"""Top-k SAEs whose budget is chosen at inference: HierarchicalTopK (one SAE for every k <= K) and AdaptiveK
(k per input, set by a linear complexity probe).

HierarchicalTopK (Balagansky et al., EMNLP 2025) encodes like TopK; only its training objective differs: the
reconstruction error is averaged over the budgets j in J of each token's top-j latents
(toolkit.training.budget_objectives), so `sae.encode(x, k=j)` is a good SAE for every j <= K.

AdaptiveK (Yao et al., 2025; reference code hiyukie/adaptiveK, dictionary_learning/trainers/dynamic_topk.py)
keeps each input's top-k latents with

    s = clamp(x · probe_weight + probe_bias, 0, 1)          complexity predicted from the input itself
    k = round(k_min + sigmoid(6 (s - 0.5)) · (k_max - k_min))   k_max = cfg.k

The reference applies its probe to a context's last-token activation; here every row is treated as the last
token of its own prefix, so a token's k follows the complexity of the text up to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from toolkit.errors import ArgumentError
from toolkit.sae.architectures import Budget, TopK, register

if TYPE_CHECKING:
    from toolkit.sae.sae import SAE

SIGMOID_STEEPNESS = 6.0  # the reference's map_complexity_to_k: sigmoid(6 (s - 0.5))
PROBE_INIT_BIAS = 0.5  # an unfitted probe predicts the middle complexity, i.e. k = (k_min + k_max) / 2


class HierarchicalTopK(TopK):
    """TopK with maximum budget K = cfg.k, trained so that every k <= K reconstructs well (`encode(x, k=...)`)."""

    name = "hierarchical_topk"


class AdaptiveK(TopK):
    """Top-k with a budget per input in k_min..k_max, from the complexity probe (probe_weight, probe_bias)."""

    name = "adaptivek"
    extra_fields = ("k_min",)
    has_probe = True

    def default_budget(self, sae: SAE, x: torch.Tensor) -> Budget:
        return budget_from_complexity(complexity(sae, x), sae.cfg.k_min, sae.cfg.k)


def complexity(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Predicted complexity s in [0, 1] of prepared inputs x (N, d_in) (b_dec already subtracted if the SAE does)."""
    raw = x + sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    return (raw @ sae.probe_weight + sae.probe_bias).clamp(0.0, 1.0)


def budget_from_complexity(s: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """k = round(k_min + sigmoid(6 (s - 0.5)) (k_max - k_min)) as int64, for complexities s in [0, 1]."""
    factor = torch.sigmoid(SIGMOID_STEEPNESS * (s.detach().float() - 0.5))
    return (k_min + factor * (k_max - k_min)).round().clamp(k_min, k_max).long()


def check_k(sae: SAE, k: Any) -> int:
    """`k` as an int in 1..cfg.k; ArgumentError for k <= 0, k > K or an architecture without a budget."""
    if not sae.arch.takes_k:
        raise ArgumentError(f"{sae.name}: k= chooses the budget of the top-k family (topk, hierarchical_topk, "
                            f"adaptivek); architecture {sae.cfg.architecture!r} sets its own sparsity")
    if isinstance(k, bool) or not hasattr(k, "__index__") or not 1 <= int(k) <= sae.cfg.k:
        raise ArgumentError(f"{sae.name}: k must be an integer in 1..{sae.cfg.k} (the trained maximum "
                            f"K = cfg.k); got {k!r}")
    return int(k)


def resolve_budget(sae: SAE, xin: torch.Tensor, k: Any, lead: torch.Size) -> Budget:
    """The checked budget of `sae` for prepared rows xin (leading shape `lead`): None, an int or an int64 (N,)."""
    k = sae.inference_k if k is None else k
    if k is None:
        return sae.arch.default_budget(sae, xin)
    if not isinstance(k, torch.Tensor) or k.ndim == 0:
        return check_k(sae, k.item() if isinstance(k, torch.Tensor) else k)
    check_k(sae, 1)  # the architecture takes k at all
    if k.is_floating_point() or k.dtype == torch.bool or tuple(k.shape) != tuple(lead):
        raise ArgumentError(f"{sae.name}: a per-token k must be an integer tensor of shape {tuple(lead)} "
                            f"(the activations' leading shape); got {k.dtype} {tuple(k.shape)}")
    k = k.to(xin.device).reshape(-1).long()
    if k.numel() and (int(k.min()) < 1 or int(k.max()) > sae.cfg.k):
        raise ArgumentError(f"{sae.name}: per-token k must lie in 1..{sae.cfg.k}; got "
                            f"{int(k.min())}..{int(k.max())}")
    return k


HIERARCHICAL_TOPK = register(HierarchicalTopK())
ADAPTIVEK = register(AdaptiveK())
