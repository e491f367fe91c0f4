"""EleutherAI sparsify hookpoint folders (cfg.json + sae.safetensors), read as a TopK SAE's tensors."""

from __future__ import annotations

import os
import re
from pathlib import Path

from toolkit.errors import CheckpointError
from toolkit.io import Weights, load_tensors, read_json
from toolkit.sae.formats.common import build, dtype_name, need, take


def read_sparsify(folder: str | os.PathLike, *, dtype: str | None = None, model: str | None = None,
                  site: str | None = None) -> Weights:
    """Read one sparsify hookpoint folder (cfg.json + sae.safetensors) as a TopK SAE.

    sparsify encodes topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias)) and decodes with W_dec + b_dec.
    Transcoders, skip connections, groupmax and signed variants are refused. dtype defaults to the file's.
    """
    folder = Path(folder)
    cfg_file, weights_file = folder / "cfg.json", folder / "sae.safetensors"
    raw = read_json(cfg_file, "sparsify config")
    d_in, k = need(raw, "d_in", cfg_file), need(raw, "k", cfg_file)
    d_sae = raw.get("num_latents") or d_in * need(raw, "expansion_factor", cfg_file)
    if raw.get("activation", "topk") != "topk":
        raise CheckpointError(f"{cfg_file}: activation {raw['activation']!r} is not supported (only topk)")
    for flag in ("transcode", "skip_connection", "signed", "embed_skip", "gram_lookup"):
        if raw.get(flag):
            raise CheckpointError(f"{cfg_file}: {flag}=true is not supported (plain sparse autoencoders only)")
    tensors = dict(load_tensors(weights_file))
    take(tensors, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in),
                   "b_dec": (d_in,)}, weights_file)
    ours = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
            "b_dec": tensors["b_dec"]}
    match = re.fullmatch(r"(?:model\.)?layers[._](\d+)", folder.name)  # a decoder layer's output
    parent_cfg = folder.parent / "config.json"
    if model is None and parent_cfg.is_file():
        try:
            model = read_json(parent_cfg).get("model")
        except CheckpointError:
            model = None
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": "topk", "k": k,
           "dtype": dtype_name(dtype or tensors["encoder.weight"].dtype, weights_file), "apply_b_dec_to_input": True,
           "model": model if isinstance(model, str) else None,
           "site": site or (f"blocks.{match[1]}.resid_post" if match else None)}
    return build(cfg, ours, weights_file=weights_file, cfg_file=cfg_file)
