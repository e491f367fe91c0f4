"""Run a model with an SAE's reconstruction spliced in at its site — one SAE pass per forward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from toolkit.sae.sae import SAE
from toolkit.tracing import Splice, generate, run_with_edits
from toolkit.tracing.intervene import Edit

if TYPE_CHECKING:
    from toolkit.models import Model

CodesFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SpliceRecord:
    """What the last spliced forward saw: input activations, codes and reconstruction at the site."""

    x: list[torch.Tensor] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)
    reconstruction: list[torch.Tensor] = field(default_factory=list)

    def clear(self) -> None:
        self.x.clear()
        self.codes.clear()
        self.reconstruction.clear()


def sae_splice(sae: SAE, model: Model, site: str | None = None, *, keep_error: bool = False,
               edit_codes: CodesFn | None = None, record: SpliceRecord | None = None,
               positions: Any = None, skip_bos: bool = True) -> Splice:
    """An edit that replaces the activation at the SAE's site with its reconstruction.

    keep_error=True adds back the SAE's error (x - recon), so downstream is unchanged unless `edit_codes`
    changes the codes: then the output is x + decode(edited) - decode(codes), still one encode and one decode.
    `record` collects x, codes and reconstruction of every call (for metrics). BOS positions keep the model's
    own activation (skip_bos=True): SAEs are trained without BOS. Width and site are checked first.
    """
    s = sae.check_compatible(model, site)

    def fn(x: torch.Tensor) -> torch.Tensor:
        xs = x.to(sae.device)
        out = sae(xs)
        codes, recon = out.codes, out.reconstruction
        if edit_codes is not None:
            new_codes = edit_codes(codes)
            # decode is affine, so decode(new) - decode(codes) = decode(new - codes) minus its bias term
            delta = sae.decode(new_codes - codes) - sae.b_dec / sae.input_scale
            new = (xs + delta) if keep_error else (recon + delta)
        else:
            new = xs if keep_error else recon
        if record is not None:
            record.x.append(xs.detach().cpu())
            record.codes.append(codes.detach().cpu())
            record.reconstruction.append(recon.detach().cpu())
        return new.to(x.dtype).to(x.device)

    return Splice(s, fn, positions=positions, skip_bos=skip_bos)


def run_with_sae(model: Model, inputs: Any, sae: SAE, site: str | None = None, *, keep_error: bool = False,
                 edit_codes: CodesFn | None = None, extra_edits: Sequence[Edit] = (),
                 record: SpliceRecord | None = None) -> torch.Tensor:
    """Final logits of `model` on `inputs` with the SAE spliced in (see sae_splice)."""
    edit = sae_splice(sae, model, site, keep_error=keep_error, edit_codes=edit_codes, record=record)
    logits, _ = run_with_edits(model, inputs, [edit, *extra_edits])
    return logits


def generate_with_sae(model: Model, prompts: str | Sequence[str], sae: SAE, site: str | None = None, *,
                      keep_error: bool = True, edit_codes: CodesFn | None = None, **kwargs: Any) -> list[str]:
    """Generate with the SAE spliced in at every step (keep_error=True by default, so only code edits act)."""
    edit = sae_splice(sae, model, site, keep_error=keep_error, edit_codes=edit_codes)
    return generate(model, prompts, [edit], **kwargs)
