"""Training objectives of the top-k SAEs with a budget chosen at inference (toolkit.sae.budgets).

- hierarchical_topk   mean over j in J of ||x - x̂_j||², x̂_j = b_dec + the top-j latents of each token,
                      + α AuxK on the residual at K                         (Balagansky et al., EMNLP 2025)
- adaptivek           ||x - x̂||² with each token's top-k, k from the frozen complexity probe,
                      + λ d_in E||f||₁ / E||x|| + α AuxK                     (Yao et al. 2025, dynamic_topk.py)

HierarchicalTopK computes every x̂_j at once without a (B, K, d_in) stack of partial sums: with r = x - b_dec,
active decoder rows w_i and values v_i sorted by value, ||r - Σ_{i<=j} v_i w_i||² = ||r||² - 2 Σ_{i<=j} v_i r·w_i
+ Σ_{i,l<=j} v_i v_l w_i·w_l, i.e. cumulative sums over K and over the (B, K, K) Gram matrix of the active rows.
AdaptiveK's L1 coefficient λ is in the reference's units: its squared error averages over d_in, ours sums, so the
term is multiplied by d_in to keep the reference's balance. The probe's k is rounded, so (as in the reference)
the SAE loss sends no gradient to the probe; the joint phase trains it on its own ridge loss (sae_trainer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import toolkit.kernels as kernels
from toolkit.sae.budgets import budget_from_complexity, complexity
from toolkit.training.objectives import (
    LossContext,
    LossOutput,
    _aux_k,
    _encoder_input,
    _fired,
    _sparse_values,
    _sq_err,
    _zero,
    register_objective,
)

if TYPE_CHECKING:
    from toolkit.sae.sae import SAE


def prefix_errors(r: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, *,
                  dense_gram: bool | None = None) -> torch.Tensor:
    """(B, K) squared errors ||r - Σ_{i<=j} values_i W_dec[indices_i]||² for every prefix j, from r (B, d) and
    values, indices (B, K) (differentiable in r, values and W_dec).

    The dot products come from the dense W_dec W_decᵀ (d_sae²) and r W_decᵀ when those are no larger than the
    gathered rows (B, K, d) — dense matmuls are ~4x faster on CPU — and from the gathered rows otherwise."""
    B, K = indices.shape
    d_sae, d = W_dec.shape
    if dense_gram is None:
        dense_gram = d_sae * d_sae <= B * K * d
    if dense_gram:
        rw = (r @ W_dec.T).gather(1, indices)
        dots = (W_dec @ W_dec.T)[indices[:, :, None], indices[:, None, :]]
    else:
        rows = W_dec[indices]
        rw, dots = torch.einsum("bkd,bd->bk", rows, r), rows @ rows.transpose(1, 2)
    cross = (values * rw).cumsum(1)
    sq = (values[:, :, None] * values[:, None, :] * dots).cumsum(1).cumsum(2).diagonal(dim1=1, dim2=2)
    return r.pow(2).sum(-1, keepdim=True) - 2 * cross + sq


@register_objective("hierarchical_topk")
def hierarchical_topk_objective(sae: SAE, x: torch.Tensor, ctx: LossContext) -> LossOutput:
    """Mean over the budgets j in J of the squared error of each token's top-j latents + α · AuxK (at K)."""
    x_in = _encoder_input(sae, x)
    with torch.no_grad():
        vals, idx = kernels.encode_topk(x_in, sae.W_enc, sae.b_enc, sae.cfg.k)  # sorted, largest first
    vals = _sparse_values(sae, x_in, idx, vals)
    errors = prefix_errors(x - sae.b_dec, vals, idx, sae.W_dec)
    J = ctx.budgets or range(1, sae.cfg.k + 1)
    loss = errors[:, torch.as_tensor(J, device=x.device) - 1].mean()
    recon = kernels.decode_sparse(idx, vals, sae.W_dec, sae.b_dec)
    mse = _sq_err(x, recon)
    aux = _aux_k(sae, x_in, x, recon, ctx)
    live = vals.detach() > 0
    return LossOutput(loss + ctx.aux_coefficient * aux, recon.detach(), mse.detach(), _zero(x), aux.detach(),
                      live.sum(-1).float().mean(), _fired(idx, vals.detach(), sae.d_sae), None)


def adaptive_codes(sae: SAE, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices), each (B, k_max): every row's top-k latents for the probe's k, the rest 0 (no gradient)."""
    with torch.no_grad():
        k = budget_from_complexity(complexity(sae, x_in), sae.cfg.k_min, sae.cfg.k)
        vals, idx = kernels.encode_topk(x_in, sae.W_enc, sae.b_enc, sae.cfg.k)
        vals = vals * (torch.arange(sae.cfg.k, device=x_in.device) < k[:, None])
    return _sparse_values(sae, x_in, idx, vals), idx


@register_objective("adaptivek")
def adaptivek_objective(sae: SAE, x: torch.Tensor, ctx: LossContext) -> LossOutput:
    """Squared error of each token's top-k (k from the probe) + λ d_in E||f||₁ / E||x|| + α · AuxK."""
    x_in = _encoder_input(sae, x)
    vals, idx = adaptive_codes(sae, x_in)
    recon = kernels.decode_sparse(idx, vals, sae.W_dec, sae.b_dec)
    mse = _sq_err(x, recon)
    l1 = vals.sum(-1).mean() / x.norm(dim=-1).mean().clamp_min(1e-12)
    aux = _aux_k(sae, x_in, x, recon, ctx)
    live = vals.detach() > 0
    loss = mse + ctx.coefficient * sae.d_in * l1 + ctx.aux_coefficient * aux
    return LossOutput(loss, recon.detach(), mse.detach(), l1.detach(), aux.detach(), live.sum(-1).float().mean(),
                      _fired(idx, vals.detach(), sae.d_sae), None)
