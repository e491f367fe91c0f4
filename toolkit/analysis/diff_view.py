"""Per-latent details of a crosscoder for the model-diff explorer: the latent's top contexts, with each token
shaded per model by what that model's activation feeds into the latent, and its decoder lens.

A crosscoder latent has one activation per token, computed from both models' activations together:
    pre_j = sum_m (x_m * s_m) @ W_enc[m][:, j] + b_enc[j]
so what model m contributes is c_m = (x_m * s_m) @ W_enc[m][:, j]. Shading the same tokens by c_base and c_ft
shows whether the latent is driven by the fine-tuned model's activations, the base model's, or both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from toolkit.analysis.diff import decoder_lens, latent_contexts
from toolkit.crosscoder import Crosscoder, PairedActivations
from toolkit.errors import FeatureIndexError, check_finite


@torch.no_grad()
def model_contributions(cc: Crosscoder, acts: torch.Tensor, latent: int) -> torch.Tensor:
    """(n, 2) what the base ([:, 0]) and fine-tuned ([:, 1]) activations in `acts` (n, 2, d_in) add to latent
    `latent`'s pre-activation (before the bias and the sparsity rule)."""
    if isinstance(latent, bool) or not isinstance(latent, (int, np.integer)) or not 0 <= latent < cc.d_sae:
        raise FeatureIndexError(f"latent index must be an integer in 0..{cc.d_sae - 1}, got {latent!r}")
    check_finite(acts, f"paired activations given to latent {latent} of {cc.name}")
    x = acts.to(cc.device, torch.float32) * cc.input_scale.float()[:, None]
    return torch.einsum("nmd,md->nm", x, cc.W_enc[:, :, int(latent)].float()).cpu()


class DiffDetails:
    """details(latent) -> {"base": [ctx], "ft": [ctx], "lens": {title: [(token, value)]}} (the widget contract):
    the latent's `k` strongest tokens in `pairs`, each with `window` (before, after) tokens of context, shaded by
    each model's contribution; the lens reads the decoder difference (what fine-tuning added) and each model's
    decoder through `model` (omitted without a model)."""

    def __init__(self, cc: Crosscoder, pairs: PairedActivations, tokenizer: Any, model: Any = None, *, k: int = 5,
                 window: tuple[int, int] = (8, 3), lens_k: int = 8) -> None:
        if pairs.tokens is None or pairs.positions is None:
            raise ValueError("DiffDetails needs pairs with tokens and positions (PairedActivations.from_caches(..., "
                             "tokens=contexts) or split_paired of such pairs)")
        self.cc, self.pairs, self.tokenizer, self.model = cc, pairs, tokenizer, model
        self.k, self.window, self.lens_k = k, window, lens_k
        self._row = {(int(c), int(p)): i for i, (c, p) in enumerate(pairs.positions.tolist())}

    def context(self, latent: int, c: int, p: int) -> tuple[list[str], np.ndarray]:
        """Tokens of context row `c` around position `p` and the (tokens, 2) per-model contributions (0 where a
        token has no activation row, e.g. BOS)."""
        before, after = self.window
        lo, hi = max(0, p - before), min(self.pairs.tokens.shape[1], p + after + 1)
        rows = [self._row.get((c, q), -1) for q in range(lo, hi)]
        have = [r for r in rows if r >= 0]
        contrib = np.zeros((hi - lo, 2), np.float32)
        if have:
            vals = model_contributions(self.cc, self.pairs.acts[have], latent).numpy()
            contrib[[i for i, r in enumerate(rows) if r >= 0]] = vals
        ids = self.pairs.tokens[c, lo:hi].tolist()
        return [self.tokenizer.decode([t]) for t in ids], contrib

    def __call__(self, latent: int) -> dict[str, Any]:
        base, ft = [], []
        for lc in latent_contexts(self.cc, self.pairs, latent, self.tokenizer, k=self.k, window=self.window[0]):
            toks, contrib = self.context(latent, lc.context, lc.position)
            base.append({"tokens": toks, "acts": np.clip(contrib[:, 0], 0, None).tolist()})
            ft.append({"tokens": toks, "acts": np.clip(contrib[:, 1], 0, None).tolist()})
        lens = {} if self.model is None else {
            title: decoder_lens(self.cc, self.model, latent, which=which, k=self.lens_k)
            for title, which in (("fine-tune − base promotes", "diff"), ("fine-tune decoder promotes", "ft"),
                                 ("base decoder promotes", "base"))}
        return {"base": base, "ft": ft, "lens": lens}
