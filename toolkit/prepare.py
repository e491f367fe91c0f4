"""Prepare what the tutorials train or build on first use (the SAE and feature store of 01, the fine-tune and
crosscoder of 03), so they start in seconds.

`python -m toolkit prepare --tutorials` calls `prepare_tutorials`; Binder's postBuild runs it at build time.
The settings below are the tutorials' own (CI size, or `TOOLKIT_NB_SIZE=full`); the artefacts are found by
the same cache keys the notebooks compute, so a tutorial whose settings change simply trains on first use.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

TUTORIAL_SAE = {  # notebooks/01_sae_features.ipynb (its corpus also feeds 02's activation cache)
    "ci": dict(site="blocks.6.resid_post", architecture="topk", d_sae=4096, k=32, steps=300, n_contexts=512),
    "full": dict(site="blocks.6.resid_post", architecture="topk", d_sae=4096, k=32, steps=2000, n_contexts=2048),
}
TUTORIAL_STORE_CONTEXTS = {"ci": 128, "full": 256}  # 01's held-out contexts: the last n of 128 tokens
TUTORIAL_FINETUNE = "pirate"  # notebooks/03_model_diff.ipynb
TUTORIAL_CROSSCODER = {  # notebooks/03_model_diff.ipynb
    "ci": dict(n_contexts=256, ctx_len=64, d_sae=1024, k=32, steps=600),
    "full": dict(n_contexts=1024, ctx_len=64, d_sae=4096, k=32, steps=3000),
}
TUTORIAL_CROSSCODER_SITE = "blocks.13.resid_post"


def _tutorial_sae(size: str, progress: bool) -> str:
    from toolkit.models import load_model
    from toolkit.training.zoo import CorpusSpec, trained_sae

    spec = dict(TUTORIAL_SAE[size])
    n_contexts = spec.pop("n_contexts")
    model = load_model("default", progress=progress)
    site = spec.pop("site")
    sae = trained_sae(model, site, spec.pop("architecture"), corpus=CorpusSpec(n_contexts=n_contexts),
                      progress=progress, **spec)
    return f"SAE of tutorial 01 ({site}, {sae.cfg.d_sae} latents)"


def _tutorial_features(size: str, progress: bool) -> str:
    from toolkit.analysis.feature_store import build_feature_store
    from toolkit.data import load_texts, token_contexts
    from toolkit.models import load_model
    from toolkit.training.zoo import CorpusSpec, trained_sae

    spec = dict(TUTORIAL_SAE[size])
    model = load_model("default", progress=progress)
    sae = trained_sae(model, spec.pop("site"), spec.pop("architecture"),
                      corpus=CorpusSpec(n_contexts=spec.pop("n_contexts")), progress=progress, **spec)
    held_out = token_contexts(model.tokenizer, load_texts("default"), 128)[-TUTORIAL_STORE_CONTEXTS[size]:]
    store = build_feature_store(model, sae, held_out, progress=progress)
    return f"feature store of tutorial 01 ({len(store)} latents over {len(held_out)} contexts)"


def _tutorial_finetune(size: str, progress: bool) -> str:
    from toolkit.finetune import prepare_finetuned

    return f"fine-tune of tutorial 03: {prepare_finetuned(TUTORIAL_FINETUNE, progress=progress).name}"


def _tutorial_crosscoder(size: str, progress: bool) -> str:
    from toolkit.config import CrosscoderConfig
    from toolkit.crosscoder.paired import split_paired
    from toolkit.finetune import behaviour_contexts, load_finetuned
    from toolkit.models import load_model
    from toolkit.training.zoo import paired_activations, trained_crosscoder

    c, site = TUTORIAL_CROSSCODER[size], TUTORIAL_CROSSCODER_SITE
    ft = load_finetuned(TUTORIAL_FINETUNE, progress=progress)  # the fine-tune first, as the tutorial loads them
    base = load_model("default", progress=progress)
    contexts = behaviour_contexts(base.tokenizer, TUTORIAL_FINETUNE, c["n_contexts"], c["ctx_len"])
    train, _ = split_paired(paired_activations(base, ft, site, contexts, batch_size=16, progress=progress), (0.8, 0.2))
    cfg = CrosscoderConfig(d_in=base.d_model, d_sae=c["d_sae"], architecture="batchtopk", k=c["k"],
                           models=(base.name, ft.name), site=site)
    cc = trained_crosscoder(cfg, train, total_steps=c["steps"], batch_size=512, lr=2e-3, seed=0, progress=progress)
    return f"crosscoder of tutorial 03 ({site}, {cc.cfg.d_sae} latents)"


STEPS: dict[str, Callable[[str, bool], str]] = {"sae": _tutorial_sae, "features": _tutorial_features,
                                                "finetune": _tutorial_finetune, "crosscoder": _tutorial_crosscoder}


def prepare_tutorials(size: str = "ci", *, only: list[str] | None = None, progress: bool = True,
                      log: Callable[[str], None] = lambda _: None) -> list[tuple[str, float]]:
    """Make (once) each artefact the tutorials would otherwise train on first use; returns (what, seconds).

    `size` is "ci" (what Binder users and CI run) or "full" (TOOLKIT_NB_SIZE=full); `only` picks steps by
    name from `STEPS`. Each step frees its models before the next one, so the peak is one model at a time.
    """
    if size not in TUTORIAL_SAE:
        raise ValueError(f"size must be one of {', '.join(TUTORIAL_SAE)}, got {size!r}")
    names = list(STEPS) if only is None else only
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"unknown prepare step(s) {unknown}; known: {', '.join(STEPS)}")
    done = []
    for name in names:
        t = time.perf_counter()
        what = STEPS[name](size, progress)
        gc.collect()
        done.append((what, time.perf_counter() - t))
        log(f"{what}: ready in {done[-1][1]:.0f} s")
    return done


def disk_usage(folder: str | os.PathLike) -> int:
    """Bytes under `folder`, following no symlinks (a linked model folder is counted where it lives)."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total
