"""SAELens folders (cfg.json + sae_weights.safetensors), pre-6.0 and 6.x config layouts, read as our tensors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError
from toolkit.io import Weights, load_tensors, read_json
from toolkit.sae.formats.common import build, dtype_name, need, site_or_none, take

SAELENS_ARCHITECTURES = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk", "batchtopk": "batchtopk"}


def _fold_decoder_norm(t: dict[str, torch.Tensor]) -> None:
    # SAELens' rescale_acts_by_decoder_norm: pre * |W_dec row| then codes / |W_dec row| before decoding;
    # folding the norms into W_enc, b_enc and W_dec gives the same codes and reconstruction.
    norms = t["W_dec"].norm(dim=-1).clamp(min=1e-8)
    t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]


def _architecture(raw: dict[str, Any], cfg_file: Path) -> str:
    """Our architecture name for a SAELens config (pre-6.0 'standard' + activation 'topk' is topk)."""
    peer_arch = raw.get("architecture") or "standard"
    activation = raw.get("activation_fn") or raw.get("activation_fn_str") or "relu"
    if peer_arch == "standard" and activation == "topk":
        peer_arch = "topk"
    elif peer_arch == "standard" and activation != "relu":
        raise CheckpointError(f"{cfg_file}: activation {activation!r} is not supported (relu, topk)")
    if peer_arch not in SAELENS_ARCHITECTURES:
        why = " (its gate and magnitude paths have no equivalent here)" if peer_arch == "gated" else ""
        raise CheckpointError(
            f"{cfg_file}: SAELens architecture {peer_arch!r} is not supported{why}; "
            f"supported: {', '.join(SAELENS_ARCHITECTURES)}"
        )
    return SAELENS_ARCHITECTURES[peer_arch]


def _check_settings(raw: dict[str, Any], cfg_file: Path) -> None:
    """Refuse input normalizations and head-level hooks we cannot reproduce; warn about a dataset constant."""
    normalize = raw.get("normalize_activations")
    normalize = {None: "none", False: "none", True: "expected_average_only_in"}.get(normalize, normalize)
    if normalize == "expected_average_only_in":
        warnings.warn(f"{cfg_file}: trained on activations scaled by a dataset constant that the folder does not "
                      "store; loaded with input_scale=1 (as SAELens does from disk). Set sae.input_scale if you "
                      "know it.", stacklevel=4)
    elif normalize != "none":
        raise CheckpointError(f"{cfg_file}: normalize_activations={normalize!r} is not supported "
                              "(per-input normalization); supported: none, expected_average_only_in")
    if raw.get("hook_head_index", (raw.get("metadata") or {}).get("hook_head_index")) is not None:
        raise CheckpointError(f"{cfg_file}: SAEs on a single attention head (hook_head_index) are not supported")


def _tensors(weights_file: Path, arch: str, d_in: int, d_sae: int, rescale: bool) -> dict[str, torch.Tensor]:
    """The weights under our names, thresholds and decoder-norm rescaling folded in."""
    tensors = dict(load_tensors(weights_file))
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors:
            if not torch.all(tensors[name] == 1):
                raise CheckpointError(f"{weights_file}: a fine-tuning {name} other than 1 is not supported")
            del tensors[name]
    if "log_threshold" in tensors:  # older SAELens jumprelu training checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
                                          "b_dec": (d_in,)}
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    take(tensors, shapes, weights_file, optional=("topk_threshold",) if arch == "batchtopk" else ())
    if arch == "batchtopk":
        tensors["threshold"] = tensors.pop("topk_threshold", torch.tensor(-1.0)).reshape(())
    if arch in ("topk", "batchtopk") and rescale:
        _fold_decoder_norm(tensors)
    return tensors


def read_saelens(folder: str | os.PathLike, *, dtype: str | None = None, model: str | None = None,
                 site: str | None = None) -> Weights:
    """Read a SAELens folder (cfg.json + sae_weights.safetensors), pre-6.0 or 6.x config layout.

    Supported architectures: standard (ReLU), jumprelu, topk (also pre-6.0 'standard' + activation 'topk'),
    batchtopk training checkpoints. Gated and other SAELens architectures are refused.
    """
    folder = Path(folder)
    cfg_file, weights_file = folder / "cfg.json", folder / "sae_weights.safetensors"
    raw = read_json(cfg_file, "SAELens config")
    d_in, d_sae = need(raw, "d_in", cfg_file), need(raw, "d_sae", cfg_file)
    meta = raw.get("metadata") or {}
    arch = _architecture(raw, cfg_file)
    _check_settings(raw, cfg_file)
    k = (raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")) if arch in ("topk", "batchtopk") else None
    if k is not None and (isinstance(k, bool) or not float(k).is_integer()):
        raise CheckpointError(f"{cfg_file}: k must be an integer, got {k!r}")
    tensors = _tensors(weights_file, arch, d_in, d_sae, bool(raw.get("rescale_acts_by_decoder_norm", False)))
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": arch, "k": None if k is None else int(k),
           "dtype": dtype_name(dtype or raw.get("dtype") or "float32", cfg_file),
           "apply_b_dec_to_input": raw.get("apply_b_dec_to_input", True),
           "model": model or meta.get("model_name") or raw.get("model_name"),
           "site": site or site_or_none(meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point"))}
    return build(cfg, tensors, weights_file=weights_file, cfg_file=cfg_file)
