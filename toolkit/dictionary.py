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
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter

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

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Random unit-norm decoder directions, the encoder their transpose, zero biases (thresholds keep their init)."""
        if self.W_dec.is_meta:
            return
        device = self.W_dec.device
        gen = None if seed is None else torch.Generator(device).manual_seed(seed)
        w = torch.randn(*self.W_dec.shape, generator=gen, device=device)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(self.encoder_from_decoder(w))
        self.b_enc.zero_()
        self.b_dec.zero_()

    def encoder_from_decoder(self, w: torch.Tensor) -> torch.Tensor:
        """The encoder weight that reads each latent along its decoder direction (the transpose)."""
        raise NotImplementedError

    def _apply(self, fn: Any, recurse: bool = True) -> Dictionary:
        out = super()._apply(fn, recurse)  # keep cfg.dtype truthful after .to(dtype) / .half() / .double()
        name = DTYPE_NAMES.get(self.W_enc.dtype)
        if name is not None and name != self.cfg.dtype:
            self.cfg = dataclasses.replace(self.cfg, dtype=name)
        return out
