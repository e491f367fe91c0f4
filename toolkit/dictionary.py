"""What SAEs and crosscoders share as modules: sizes read from their config, dtype and device, and a config
whose dtype stays truthful after `.to(dtype)`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from toolkit.io import DTYPE_NAMES


class Dictionary(nn.Module):
    """Base of SAE and Crosscoder: `cfg` (with d_in, d_sae, dtype) and the encoder weight `W_enc`."""

    cfg: Any
    W_enc: nn.Parameter

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def random_unit_rows(self, seed: int | None, *shape: int) -> torch.Tensor:
        """Gaussian directions of unit norm along the last dimension, on the module's device (seeded if given)."""
        device = self.W_enc.device
        gen = None if seed is None else torch.Generator(device).manual_seed(seed)
        w = torch.randn(*shape, generator=gen, device=device)
        return w / w.norm(dim=-1, keepdim=True)

    def _apply(self, fn: Any, recurse: bool = True) -> Dictionary:
        out = super()._apply(fn, recurse)  # keep cfg.dtype truthful after .to(dtype) / .half() / .double()
        name = DTYPE_NAMES.get(self.W_enc.dtype)
        if name is not None and name != self.cfg.dtype:
            self.cfg = dataclasses.replace(self.cfg, dtype=name)
        return out
