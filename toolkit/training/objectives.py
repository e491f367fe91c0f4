"""Training objectives: one per SAE architecture, registered by name, and the crosscoder's; AuxK shared by both.

Every objective reads activations that are already normalized and returns a `LossOutput`:

- relu        ||x - x̂||² + λ Σ_i f_i ||W_dec[i]||             (decoder-norm-weighted L1; Anthropic, April 2024)
- jumprelu    ||x - x̂||² + λ L0, thresholds trained as log θ through straight-through estimators with a
              rectangle kernel of bandwidth ε ("Jumping Ahead": the L0 term sends gradient to θ only)
- topk        ||x - x̂||² + α AuxK                                 (OpenAI "Scaling and evaluating SAEs")
- batchtopk   as topk, with the k·B largest activations of the whole batch     ("BatchTopK Sparse Autoencoders")
- matryoshka  Σ_w ||x - x̂_w||² over the nested prefixes w, BatchTopK codes, + α AuxK     (Matryoshka SAEs)
- hierarchical_topk, adaptivek: see toolkit.training.budget_objectives

||·||² is summed over d_in and averaged over tokens. The top-k family encodes sparsely: pre-activations are
computed without autograd, and the selected values get their gradient from `_SparseEncode`, whose backward
touches only the selected (token, latent) pairs; reconstructions read only the active decoder rows
(`kernels.decode_sparse` for TopK's fixed k per token, embedding_bag over CSR codes for BatchTopK's variable
counts). JumpReLU encodes densely (θ needs every pre-activation) but keeps only the entries that fire or lie
within ε/2 below θ: the rest get no gradient under its estimators, so its decode and backward are sparse too.
tests/sae/test_train.py checks these gradients against dense autograd and the paper's dense formulas. ReLU + L1
stays dense.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

import toolkit.kernels as kernels
from toolkit.training import distributed

if TYPE_CHECKING:
    from toolkit.crosscoder import Crosscoder
    from toolkit.sae.sae import SAE


class LossContext(NamedTuple):
    """What an objective needs beyond the SAE and the batch."""

    coefficient: float
    """Current sparsity coefficient λ (L1 for relu, L0 for jumprelu) after warmup and target-L0 control."""
    log_threshold: torch.Tensor | None
    """'jumprelu': the trained log-thresholds (d_sae,)."""
    bandwidth: float
    """'jumprelu': rectangle-kernel width ε of the straight-through estimators."""
    dead: torch.Tensor | None
    """(d_sae,) bool: latents that have not fired for dead_after_tokens (AuxK revives them)."""
    aux_k: int
    """Dead latents the AuxK loss may use per token."""
    aux_coefficient: float
    """Weight α of the AuxK loss (0: off)."""
    budgets: tuple[int, ...] | None = None
    """'hierarchical_topk': the budgets J whose reconstructions the loss averages (None: every j in 1..K)."""


class LossOutput(NamedTuple):
    """One training step's objective and the statistics the trainer tracks (all but `loss` detached)."""

    loss: torch.Tensor
    """Scalar to minimise."""
    recon: torch.Tensor
    """(B, d_in) reconstruction by the whole SAE."""
    mse: torch.Tensor
    """Mean over tokens of ||x - x̂||² (summed over d_in)."""
    sparsity: torch.Tensor
    """The sparsity penalty before its coefficient (weighted L1 or L0); 0 for the top-k family."""
    aux: torch.Tensor
    """The AuxK loss before its coefficient (0 when off or nothing is dead)."""
    l0: torch.Tensor
    """Mean number of active latents per token."""
    fired: torch.Tensor
    """(d_sae,) bool: latents active on at least one token of the batch."""
    min_selected: torch.Tensor | None
    """'batchtopk'/'matryoshka': the smallest positive activation selected (the inference-threshold sample)."""


Objective = Callable[["SAE", torch.Tensor, LossContext], LossOutput]
OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[Objective], Objective]:
    """Decorator registering the training objective of architecture `name`; a second one is refused."""

    def add(fn: Objective) -> Objective:
        if name in OBJECTIVES:
            raise ValueError(f"a training objective for {name!r} is already registered ({OBJECTIVES[name].__name__})")
        OBJECTIVES[name] = fn
        return fn

    return add


def get_objective(name: str) -> Objective:
    """The objective for architecture `name`; ValueError listing the trainable ones otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"no training objective for architecture {name!r}; trainable: {', '.join(OBJECTIVES)}") from None


# ---------------------------------------------------------------- straight-through estimators ("Jumping Ahead")


class _JumpReLUFlat(torch.autograd.Function):
    """On flat entries (pre-activation `pre` of latent `cols`): codes = pre * H(pre - θ) and step = H(pre - θ), with
    the paper's pseudo-derivatives d codes/d pre = H, d codes/dθ = -(θ/ε) K, d step/dθ = -(1/ε) K,
    K = rectangle((pre - θ)/ε); no gradient from step to pre. Only entries with pre > θ - ε/2 (firing or within
    the window) can have a gradient, so the caller passes just those."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, cols: torch.Tensor,  # noqa: ANN001
                bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
        th = theta[cols]
        on = pre > th
        ctx.save_for_backward(pre, th, on, cols)
        ctx.bandwidth, ctx.d = bandwidth, theta.shape[0]
        return pre * on, on.to(pre.dtype)

    @staticmethod
    def backward(ctx, g_codes: torch.Tensor, g_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:  # noqa: ANN001
        pre, th, on, cols = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - th).abs() < 0.5 * eps).to(pre.dtype)
        per_entry = (th * g_codes + g_step) * near * (-1.0 / eps)
        grad_theta = torch.zeros(ctx.d, dtype=pre.dtype, device=pre.device).index_add_(0, cols, per_entry)
        return g_codes * on, grad_theta, None, None


# ---------------------------------------------------------------- sparse encoder gradient


class _SparseEncode(torch.autograd.Function):
    """values[j] = relu(x[row_j] @ W_enc[:, cols[j]] + b_enc[cols[j]]) for the CSR layout (crow, cols), given the
    precomputed values. Backward costs O(nnz·d_in) instead of the dense O(B·d_sae·d_in): only selected entries
    carry gradient (zero values, e.g. padding, carry none)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, crow: torch.Tensor,  # noqa: ANN001
                cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, W_enc, crow, cols, values)
        return values

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001, ANN205
        x, W_enc, crow, cols, values = ctx.saved_tensors
        g = g * (values > 0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            grad = torch.sparse_csr_tensor(crow, cols, g, (x.shape[0], W_enc.shape[1]), check_invariants=False)
        grad_x = grad @ W_enc.T if ctx.needs_input_grad[0] else None
        grad_W = (grad.t() @ x).T if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(W_enc[0]).index_add_(0, cols, g) if ctx.needs_input_grad[2] else None
        return grad_x, grad_W, grad_b, None, None, None


def _sparse_values(sae: SAE, x_in: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Differentiable version of padded (B, K) top-k `values` at `indices`."""
    B, K = indices.shape
    crow = torch.arange(0, B * K + 1, K, device=x_in.device)
    flat = _SparseEncode.apply(x_in, sae.W_enc, sae.b_enc, crow, indices.reshape(-1), values.reshape(-1))
    return flat.view(B, K)


def _encoder_input(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    return x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x


def _fired(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    fired = torch.zeros(d_sae, dtype=torch.bool, device=indices.device)
    fired[indices[values > 0]] = True
    return fired


def _sq_err(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return (recon - x).pow(2).sum(-1).mean()


def _zero(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(())


def auxk_loss(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, residual: torch.Tensor,
              n_dead: int, aux_k: int) -> torch.Tensor:
    """AuxK (OpenAI; sparsify's form): the selected dead latents (values, indices: (B, k)) reconstruct the residual
    (B, D) through W_dec (d_sae, D); squared error over the residual's variance, scaled by min(n_dead / aux_k, 1)."""
    e_hat = kernels.decode_sparse(indices, values, W_dec)
    # data parallel: the global batch's variance, and x world size so the gradient mean over ranks is the sum
    total = distributed.global_centered_sq(residual).clamp_min(1e-12) / distributed.world_size()
    return min(n_dead / aux_k, 1.0) * (e_hat - residual).pow(2).sum() / total


def _dead_latents(ctx: LossContext) -> torch.Tensor | None:
    """Indices of the dead latents AuxK may use; None when AuxK is off or nothing is dead."""
    if ctx.dead is None or ctx.aux_coefficient == 0:
        return None
    dead_idx = ctx.dead.nonzero().squeeze(1)
    return dead_idx if dead_idx.numel() else None


def _aux_k(sae: SAE, x_in: torch.Tensor, x: torch.Tensor, recon: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """AuxK of an SAE: the top dead latents per token (by pre-activation) reconstruct the residual x - x̂."""
    dead_idx = _dead_latents(ctx)
    if dead_idx is None:
        return _zero(x)
    n_dead = int(dead_idx.numel())
    x_in = x_in.detach()
    with torch.no_grad():
        pre = torch.addmm(sae.b_enc[dead_idx], x_in, sae.W_enc[:, dead_idx]).relu_()
        vals, j = pre.topk(min(ctx.aux_k, n_dead), dim=-1, sorted=False)
        idx = dead_idx[j]
    vals = _sparse_values(sae, x_in, idx, vals)
    return auxk_loss(vals, idx, sae.W_dec, x - recon.detach(), n_dead, ctx.aux_k)


# ---------------------------------------------------------------- objectives


@register_objective("relu")
def relu_objective(sae: SAE, x: torch.Tensor, ctx: LossContext) -> LossOutput:
    """Squared error + λ · decoder-norm-weighted L1 (the decoder is free, so the norm weight prevents shrinking it)."""
    pre = torch.addmm(sae.b_enc, _encoder_input(sae, x), sae.W_enc)
    codes = F.relu(pre)
    recon = kernels.decode_dense(codes, sae.W_dec, sae.b_dec)
    mse = _sq_err(x, recon)
    l1 = (codes * sae.W_dec.norm(dim=1)).sum(-1).mean()
    active = codes > 0
    return LossOutput(mse + ctx.coefficient * l1, recon.detach(), mse.detach(), l1.detach(), _zero(x),
                      active.sum(-1).float().mean(), active.any(0), None)


@register_objective("jumprelu")
def jumprelu_objective(sae: SAE, x: torch.Tensor, ctx: LossContext) -> LossOutput:
    """Squared error + λ · L0, with the paper's straight-through estimators for θ = exp(log θ).

    The encoder runs dense; the decode and every gradient use only the entries that fire or sit within ε/2 below
    θ (the rest have no gradient under the estimators), so the backward costs a fraction of a dense one."""
    assert ctx.log_threshold is not None
    theta = ctx.log_threshold.exp()
    x_in = _encoder_input(sae, x)
    B = x.shape[0]
    with torch.no_grad():
        pre = torch.addmm(sae.b_enc, x_in, sae.W_enc)
        rows, cols = (pre > theta - 0.5 * ctx.bandwidth).nonzero(as_tuple=True)  # token-major
        vals = pre[rows, cols]
        crow = torch.cat([rows.new_zeros(1), torch.bincount(rows, minlength=B).cumsum(0)])
    del pre
    codes, step = _JumpReLUFlat.apply(_SparseEncode.apply(x_in, sae.W_enc, sae.b_enc, crow, cols, vals),
                                      theta, cols, ctx.bandwidth)
    recon = FlatCodes(crow, cols, codes).decode(sae.W_dec, sae.b_dec)
    mse = _sq_err(x, recon)
    l0 = step.sum() / B
    on = step.detach() > 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    fired[cols[on]] = True
    return LossOutput(mse + ctx.coefficient * l0, recon.detach(), mse.detach(), l0.detach(), _zero(x),
                      on.sum() / B, fired, None)


@register_objective("topk")
def topk_objective(sae: SAE, x: torch.Tensor, ctx: LossContext) -> LossOutput:
    """Squared error of the k largest latents per token + α · AuxK."""
    x_in = _encoder_input(sae, x)
    with torch.no_grad():
        vals, idx = kernels.encode_topk(x_in, sae.W_enc, sae.b_enc, sae.cfg.k)
    vals = _sparse_values(sae, x_in, idx, vals)
    recon = kernels.decode_sparse(idx, vals, sae.W_dec, sae.b_dec)
    mse = _sq_err(x, recon)
    aux = _aux_k(sae, x_in, x, recon, ctx)
    live = vals.detach() > 0
    return LossOutput(mse + ctx.aux_coefficient * aux, recon.detach(), mse.detach(), _zero(x), aux.detach(),
                      live.sum(-1).float().mean(), _fired(idx, vals.detach(), sae.d_sae), None)


class FlatCodes(NamedTuple):
    """Codes of a batch in CSR layout: token t owns entries crow[t]:crow[t+1] of (cols, values)."""

    crow: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    def decode(self, W_dec: torch.Tensor, b_dec: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Σ values · W_dec[cols] + b_dec per token (differentiable), using only latents < width if given."""
        v = self.values if width is None else self.values * (self.cols < width)
        out = F.embedding_bag(self.cols, W_dec, self.crow[:-1], per_sample_weights=v, mode="sum")
        return out + b_dec


def batch_topk_codes(sae: SAE, x_in: torch.Tensor) -> FlatCodes:
    """The k·B largest relu'd pre-activations of the batch, as differentiable FlatCodes (no per-token padding:
    BatchTopK gives tokens very different counts)."""
    B, d_sae = x_in.shape[0], sae.d_sae
    with torch.no_grad():
        acts = torch.addmm(sae.b_enc, x_in, sae.W_enc).relu_().flatten()
        if distributed.world_size() > 1:  # the k·B largest of the global batch: those >= its (k·B)-th largest
            kth = distributed.global_kth_largest(acts, sae.cfg.k * B * distributed.world_size())
            flat = ((acts >= kth) & (acts > 0)).nonzero().squeeze(1)  # already token-major
            vals = acts[flat]
        else:
            vals, flat = acts.topk(min(sae.cfg.k * B, acts.numel()), sorted=False)
            keep = vals > 0
            flat, order = flat[keep].sort()  # token-major, so each token's latents are contiguous
            vals = vals[keep][order]
        counts = torch.bincount(flat // d_sae, minlength=B)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        cols = flat % d_sae
    return FlatCodes(crow, cols, _SparseEncode.apply(x_in, sae.W_enc, sae.b_enc, crow, cols, vals))


def _flat_stats(codes: FlatCodes, B: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    v = codes.values.detach()
    fired = torch.zeros(d_sae, dtype=torch.bool, device=v.device)
    fired[codes.cols[v > 0]] = True
    live = v[v > 0]
    return (live.numel() / B) * torch.ones((), device=v.device), fired, (live.min() if live.numel() else None)


@register_objective("batchtopk")
def batchtopk_objective(sae: SAE, x: torch.Tensor, ctx: LossContext) -> LossOutput:
    """Squared error of the k·B largest latents over the batch + α · AuxK."""
    x_in = _encoder_input(sae, x)
    codes = batch_topk_codes(sae, x_in)
    recon = codes.decode(sae.W_dec, sae.b_dec)
    mse = _sq_err(x, recon)
    aux = _aux_k(sae, x_in, x, recon, ctx)
    l0, fired, min_selected = _flat_stats(codes, x.shape[0], sae.d_sae)
    return LossOutput(mse + ctx.aux_coefficient * aux, recon.detach(), mse.detach(), _zero(x), aux.detach(),
                      l0, fired, min_selected)


@register_objective("matryoshka")
def matryoshka_objective(sae: SAE, x: torch.Tensor, ctx: LossContext) -> LossOutput:
    """Σ over nested prefixes w of the squared error of the first w latents' reconstruction (BatchTopK codes) + α AuxK."""
    x_in = _encoder_input(sae, x)
    codes = batch_topk_codes(sae, x_in)
    total = _zero(x)
    recon = x
    for w in sae.cfg.matryoshka_groups:
        recon = codes.decode(sae.W_dec, sae.b_dec, None if w == sae.d_sae else w)
        total = total + _sq_err(x, recon)
    mse = _sq_err(x, recon)  # the last prefix is the whole dictionary
    aux = _aux_k(sae, x_in, x, recon, ctx)
    l0, fired, min_selected = _flat_stats(codes, x.shape[0], sae.d_sae)
    return LossOutput(total + ctx.aux_coefficient * aux, recon.detach(), mse.detach(), _zero(x), aux.detach(),
                      l0, fired, min_selected)


# ---------------------------------------------------------------- crosscoders


def crosscoder_objective(cc: Crosscoder, x: torch.Tensor, ctx: LossContext) -> LossOutput:
    """Squared error over both models (x: (B, 2, d_in), normalized) + α AuxK ('batchtopk', codes ranked by
    relu(pre) · (|d_base| + |d_ft|) over the batch) or + λ Σ f_j (|d_base| + |d_ft|) ('relu', Anthropic)."""
    pre = cc.pre_activations(x)
    codes = cc.activate(pre) if distributed.world_size() == 1 else _global_batch_topk(cc, pre)
    recon = cc.decode_normalized(codes)
    mse = (x - recon).pow(2).sum((-1, -2)).mean()
    weights = cc.code_weights()
    sparsity, aux, min_selected = _zero(x), _zero(x), None
    if cc.cfg.architecture == "relu":
        sparsity = (codes * weights).sum(-1).mean()
        loss = mse + ctx.coefficient * sparsity
    else:
        aux = _crosscoder_aux_k(cc, pre, weights, (x - recon.detach()).flatten(1), ctx)
        loss = mse + ctx.aux_coefficient * aux
        kept = (codes * weights).detach()[codes.detach() > 0]
        min_selected = kept.min() if kept.numel() else None
    active = codes.detach() > 0
    return LossOutput(loss, recon.detach(), mse.detach(), sparsity.detach(), aux.detach(),
                      active.sum(-1).float().mean(), active.any(0), min_selected)


def _global_batch_topk(cc: Crosscoder, pre: torch.Tensor) -> torch.Tensor:
    """Crosscoder.activate over the global batch (data parallel): codes whose weighted value is among the k·B
    largest of every rank's rows."""
    f = F.relu(pre)
    if cc.cfg.architecture == "relu":
        return f
    scaled = (f * cc.code_weights()).detach()
    kth = distributed.global_kth_largest(scaled.flatten(), cc.cfg.k * pre.shape[0] * distributed.world_size())
    return f * (scaled >= kth)


def _crosscoder_aux_k(cc: Crosscoder, pre: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor,
                      ctx: LossContext) -> torch.Tensor:
    dead_idx = _dead_latents(ctx)
    if dead_idx is None:
        return _zero(residual)
    n_dead = int(dead_idx.numel())
    f = F.relu(pre[:, dead_idx])
    j = (f * weights[dead_idx]).detach().topk(min(ctx.aux_k, n_dead), dim=-1, sorted=False).indices
    W_dec = cc.W_dec.reshape(cc.d_sae, 2 * cc.d_in)
    return auxk_loss(f.gather(1, j), dead_idx[j], W_dec, residual, n_dead, ctx.aux_k)
