"""saprmarks/dictionary_learning SAE save folders (ae.pt + config.json), read as our tensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError
from toolkit.io import Weights, read_json, read_torch_state
from toolkit.sae.formats.common import build, dtype_name, need, take


def _linear_pair(s: dict[str, torch.Tensor], d_in: int, d_sae: int, source: Path, b_dec: str,
                 extra: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    take(s, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "decoder.weight": (d_in, d_sae),
             b_dec: (d_in,), **extra}, source)
    return {"W_enc": s["encoder.weight"].T, "b_enc": s["encoder.bias"], "W_dec": s["decoder.weight"].T,
            "b_dec": s[b_dec]}


def _dl_autoencoder(s, d_in, d_sae, src):
    return "relu", True, _linear_pair(s, d_in, d_sae, src, "bias", {})


def _dl_autoencoder_new(s, d_in, d_sae, src):
    return "relu", False, _linear_pair(s, d_in, d_sae, src, "decoder.bias", {})


def _dl_topk(s, d_in, d_sae, src):
    # the threshold buffer of AutoEncoderTopK only serves its optional use_threshold path; default encode is top-k
    return "topk", True, _linear_pair(s, d_in, d_sae, src, "b_dec", {"k": (), "threshold": ()})


def _dl_batchtopk(s, d_in, d_sae, src):
    t = _linear_pair(s, d_in, d_sae, src, "b_dec", {"k": (), "threshold": ()})
    return "batchtopk", True, {**t, "threshold": s["threshold"]}


def _dl_matryoshka(s, d_in, d_sae, src):
    n_groups = s["group_sizes"].numel() if "group_sizes" in s else 0
    take(s, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "k": (),
             "threshold": (), "group_sizes": (n_groups,)}, src)
    return "matryoshka", True, {n: s[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}


def _dl_jumprelu(s, d_in, d_sae, src):
    take(s, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
             "threshold": (d_sae,)}, src)
    return "jumprelu", False, dict(s)  # apply_b_dec_to_input is a plain attribute there, False by default


ADAPTIVEK_SCORE_RANGE = (0.0, 10.0)  # hiyukie/adaptiveK LinearProbe(min_score=0, max_score=10): never changed there


def _dl_dynamic_topk(s, d_in, d_sae, src):
    """hiyukie/adaptiveK AutoEncoderDynamicTopK (ae.pt) + its LinearProbe (probe.pt beside it)."""
    t = _linear_pair(s, d_in, d_sae, src, "b_dec", {})
    probe_file = Path(src).parent / "probe.pt"
    if not probe_file.exists():
        raise CheckpointError(f"{probe_file}: missing; an AdaptiveK SAE sets each input's k with its probe")
    probe = take(read_torch_state(probe_file), {"weights": (d_in, 1), "bias": (1,)}, probe_file)
    lo, hi = ADAPTIVEK_SCORE_RANGE  # s = (clamp(x·w + b, lo, hi) - lo) / (hi - lo) = clamp(x·w' + b', 0, 1)
    return "adaptivek", True, {**t, "probe_weight": probe["weights"][:, 0] / (hi - lo),
                               "probe_bias": (probe["bias"][0] - lo) / (hi - lo)}


DICTIONARY_LEARNING_CLASSES = {
    "AutoEncoder": _dl_autoencoder, "AutoEncoderNew": _dl_autoencoder_new, "AutoEncoderTopK": _dl_topk,
    "BatchTopKSAE": _dl_batchtopk, "MatryoshkaBatchTopKSAE": _dl_matryoshka, "JumpReluAutoEncoder": _dl_jumprelu,
    "AutoEncoderDynamicTopK": _dl_dynamic_topk,
}


def read_dictionary_learning(path: str | os.PathLike, *, dtype: str | None = None, model: str | None = None,
                             site: str | None = None) -> Weights:
    """Read a dictionary_learning save folder (ae.pt + config.json), or an ae*.pt with config.json beside it.

    Supported dict_class: AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE,
    JumpReluAutoEncoder, and hiyukie/adaptiveK's AutoEncoderDynamicTopK (with probe.pt beside ae.pt; its
    dynamic_config.json stands in for config.json). A BatchTopK/Matryoshka threshold that was never estimated (-1)
    gives per-token top-k at inference here, where dictionary_learning would return every positive pre-activation.
    """
    path = Path(path)
    folder, weights_file = (path, path / "ae.pt") if path.is_dir() else (path.parent, path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists() and (folder / "dynamic_config.json").exists():  # AdaptiveK's save_model
        cfg_file = folder / "dynamic_config.json"
        raw = {"trainer": {**read_json(cfg_file, "AdaptiveK config"), "dict_class": "AutoEncoderDynamicTopK"}}
    else:
        raw = read_json(cfg_file, "dictionary_learning config")
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{cfg_file}: required key 'trainer' (an object) is missing")
    dict_class = need(trainer, "dict_class", cfg_file, str)
    if dict_class not in DICTIONARY_LEARNING_CLASSES:
        raise CheckpointError(f"{cfg_file}: dict_class {dict_class!r} is not supported; "
                              f"supported: {', '.join(DICTIONARY_LEARNING_CLASSES)}")
    d_in, d_sae = need(trainer, "activation_dim", cfg_file), need(trainer, "dict_size", cfg_file)
    state = read_torch_state(weights_file)
    arch, apply_b_dec, tensors = DICTIONARY_LEARNING_CLASSES[dict_class](state, d_in, d_sae, weights_file)
    cfg: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "architecture": arch, "apply_b_dec_to_input": apply_b_dec,
                           "dtype": dtype_name(dtype or tensors["W_enc"].dtype, weights_file),
                           "model": model or trainer.get("lm_name"), "site": site}
    if "k" in state:  # the module's own k buffer (config.json records k at the start; it may be annealed)
        cfg["k"] = int(state["k"])
    if arch == "adaptivek":
        cfg["k"], cfg["k_min"] = need(trainer, "max_k", cfg_file), need(trainer, "min_k", cfg_file)
    if arch == "matryoshka":
        cfg["matryoshka_groups"] = tuple(int(g) for g in state["group_sizes"].cumsum(0))
    return build(cfg, tensors, weights_file=weights_file, cfg_file=cfg_file)
