"""Crosscoder quality on held-out activations: FVU per model, L0 and dead latents."""

from __future__ import annotations

import torch

from toolkit.crosscoder.crosscoder import Crosscoder, finite_source, source_rows
from toolkit.crosscoder.paired import PairedActivations
from toolkit.errors import EmptyInputError, check_positive_int


@torch.no_grad()
def evaluate_crosscoder(cc: Crosscoder, source: PairedActivations | torch.Tensor, *,
                        batch_size: int = 2048) -> dict[str, float]:
    """Inference-mode quality: FVU of each model's reconstruction (raw units), L0 and fraction of dead latents."""
    check_positive_int(batch_size, "batch_size")
    n = source_rows(cc, source)
    data = finite_source(source)
    if n == 0:
        raise EmptyInputError("no activations to evaluate on")
    was = cc.training
    cc.eval()
    mean = data.float().mean(0).to(cc.device)
    sq_err, sq_tot, l0, fired = torch.zeros(2), torch.zeros(2), 0.0, torch.zeros(cc.d_sae, dtype=torch.bool)
    for i in range(0, n, batch_size):
        x = data[i:i + batch_size].to(cc.device, cc.dtype)
        out = cc(x)
        sq_err += (x - out.reconstruction).pow(2).sum((0, 2)).cpu()
        sq_tot += (x - mean).pow(2).sum((0, 2)).cpu()
        l0 += float((out.codes > 0).sum())
        fired |= (out.codes > 0).any(0).cpu()
    cc.train(was)
    fvu = sq_err / sq_tot.clamp_min(1e-12)
    return {"fvu_base": float(fvu[0]), "fvu_ft": float(fvu[1]), "fvu": float(sq_err.sum() / sq_tot.sum()),
            "l0": l0 / n, "dead_fraction": float((~fired).float().mean()), "n_tokens": n}
