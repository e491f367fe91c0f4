"""Crosscoders saved by saprmarks/dictionary_learning (`CrossCoder`, `BatchTopKCrossCoder`), read as our tensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from toolkit.config import CrosscoderConfig
from toolkit.errors import CheckpointError
from toolkit.io import DTYPE_NAMES, DTYPES, Weights, read_json, read_torch_state

_NORMALIZER = ("activation_mean", "activation_std", "activation_global_scale", "target_rms")


def _find_file(path: Path) -> tuple[Path, Path]:
    """(folder, weights file) for a file, or a folder holding model.safetensors or exactly one .pt."""
    if not path.is_dir():
        return path.parent, path
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(path.glob("*.pt"))
    if len(files) != 1:
        raise CheckpointError(f"{path}: expected model.safetensors or exactly one .pt file, found "
                              f"{[f.name for f in files] or 'none'}")
    return path, files[0]


def _check_state(s: dict[str, torch.Tensor], file: Path, hub: dict[str, Any]) -> tuple[int, int, bool]:
    """(d_in, d_sae, batchtopk) of a dictionary_learning crosscoder state; CheckpointError naming what is off."""
    norm = hub.get("code_normalization", "CROSSCODER")
    code_id = int(s.pop("code_normalization_id", torch.tensor(1)))  # CodeNormalization.CROSSCODER == 1
    if code_id != 1 or str(norm).upper() != "CROSSCODER":
        raise CheckpointError(f"{file}: code normalization {norm!r} (id {code_id}) is not supported; only "
                              "CROSSCODER (sum of the decoder norms) is")
    if "encoder.weight" not in s or s["encoder.weight"].ndim != 3 or s["encoder.weight"].shape[0] != 2:
        got = tuple(s["encoder.weight"].shape) if "encoder.weight" in s else "missing"
        raise CheckpointError(f"{file}: encoder.weight must be (2, d_in, d_sae) for a two-model crosscoder, got {got}")
    _, d_in, d_sae = s["encoder.weight"].shape
    shapes = {"encoder.weight": (2, d_in, d_sae), "encoder.bias": (d_sae,), "decoder.weight": (2, d_sae, d_in),
              "decoder.bias": (2, d_in)}
    batchtopk = "k" in s or "threshold" in s
    if batchtopk:
        shapes.update({"k": (), "threshold": ()})
    extra = sorted(set(s) - set(shapes) - set(_NORMALIZER))
    missing = sorted(set(shapes) - set(s))
    bad = [f"{n} {tuple(s[n].shape)} (expected {shp})" for n, shp in shapes.items()
           if n in s and tuple(s[n].shape) != shp]
    if extra or missing or bad:
        raise CheckpointError(f"{file}: not a dictionary_learning crosscoder: missing {missing}, unexpected "
                              f"{extra}, misshapen {bad}")
    return d_in, d_sae, batchtopk


def read_dictionary_learning(path: str | os.PathLike, *, models: tuple[str, str] | None = None,
                             site: str | None = None, dtype: str | None = None) -> Weights:
    """Config and tensors of a dictionary_learning crosscoder checkpoint (see Crosscoder.from_dictionary_learning).

    A newer checkpoint's activation normalizer (mean + global scale) is folded in exactly: the mean into the
    biases, the scale kept as input_scale.
    """
    folder, file = _find_file(Path(path))
    s = read_torch_state(file)
    hub = read_json(folder / "config.json", "dictionary_learning config") if (folder / "config.json").is_file() else {}
    d_in, d_sae, batchtopk = _check_state(s, file, hub)
    dt = DTYPES[dtype or DTYPE_NAMES.get(s["encoder.weight"].dtype, "float32")]
    t = {n: v.to(dt) for n, v in s.items()}
    W_enc, b_enc, b_dec = t["encoder.weight"], t["encoder.bias"], t["decoder.bias"]
    scale = torch.ones(2, dtype=dt)
    mean = t.get("activation_mean")
    if mean is not None and not bool(torch.isnan(mean).any()):
        if not hub.get("keep_relative_variance", True):
            raise CheckpointError(f"{file}: a per-neuron activation normalizer cannot be folded into a "
                                  "crosscoder; only keep_relative_variance=True (a global scale) is supported")
        g = t["activation_global_scale"]
        # x_norm = (x - mean) * g: fold the mean into the biases, keep g as the input scale
        b_enc = b_enc - g * torch.einsum("md,mdf->f", mean, W_enc)
        b_dec = b_dec + g * mean
        scale = g.expand(2).clone()
    cfg = CrosscoderConfig(d_in=d_in, d_sae=d_sae, architecture="batchtopk" if batchtopk else "relu",
                           k=int(s["k"]) if batchtopk else None, models=models, site=site, dtype=DTYPE_NAMES[dt])
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": t["decoder.weight"].permute(1, 0, 2), "b_dec": b_dec,
               "input_scale": scale}
    if batchtopk:
        tensors["threshold"] = t["threshold"]
    return Weights(cfg, tensors, str(file))
