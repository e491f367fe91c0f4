"""SAEs for the embedded default model: no pretrained ones exist offline, so train once and cache them.

Activations and SAEs live in the user cache (`toolkit.convert.cache_dir()`), keyed by model, site and
settings; a killed run resumes from its last checkpoint on the next call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.config import SAEConfig, TrainConfig
from toolkit.convert import cache_dir
from toolkit.data import load_texts, token_contexts
from toolkit.io import MANIFEST
from toolkit.sae.sae import SAE
from toolkit.sae.train import SAE_DIR, train_sae
from toolkit.tracing import ActivationCache, fill_cache
from toolkit.tracing.cache import contexts_fingerprint


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


@dataclass(frozen=True)
class CorpusSpec:
    """Which tokens to read: the offline default corpus (or another `load_texts` source) cut into contexts."""

    source: str = "default"
    ctx_len: int = 128
    n_contexts: int = 1024

    def contexts(self, model: Any) -> torch.Tensor:
        return token_contexts(model.tokenizer, load_texts(self.source), self.ctx_len, n_contexts=self.n_contexts)

    @property
    def key(self) -> str:
        return f"{_slug(self.source)}-ctx{self.ctx_len}-n{self.n_contexts}"

    def folder_key(self, model: Any, contexts: torch.Tensor | None = None) -> str:
        """`key` plus the fingerprint of the exact tokens: a changed corpus or tokenizer never reuses a cache."""
        contexts = self.contexts(model) if contexts is None else contexts
        return f"{self.key}-{contexts_fingerprint(contexts)[:12]}"


def corpus_activations(model: Any, site: str, corpus: CorpusSpec = CorpusSpec(), *, progress: bool = True,
                       dtype: torch.dtype = torch.float32) -> ActivationCache:
    """The activation cache of `model` at `site` over `corpus` (BOS dropped), filled once and reused."""
    s = model.site(site)
    contexts = corpus.contexts(model)
    folder = cache_dir() / "activations" / _slug(model.name) / s.name / corpus.folder_key(model, contexts)
    if (folder / MANIFEST).exists():
        cache = ActivationCache.open(folder, verify=False)
        if cache.complete:
            return cache
    return fill_cache(model, s, contexts, folder, resume=folder.exists(), progress=progress, dtype=dtype)


def default_train_config(site: str, architecture: str = "topk", d_in: int = 640, d_sae: int = 4096, k: int | None = 32,
                         *, steps: int = 300, batch_size: int = 2048, model_name: str = "default",
                         **overrides: Any) -> TrainConfig:
    """A sensible recipe for SAEs on the default model (override any TrainConfig field by keyword)."""
    needs_k = architecture in ("topk", "batchtopk", "matryoshka")
    groups = None
    if architecture == "matryoshka":
        groups = tuple(g for g in (d_sae // 16, d_sae // 4, d_sae) if g > 0)
    sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k if needs_k else None,
                        matryoshka_groups=groups, model=model_name, site=site)
    base: dict[str, Any] = {"sae": sae_cfg, "lr": 1e-3 if needs_k else 3e-4, "batch_size": batch_size,
                            "total_steps": steps, "warmup_steps": min(50, steps // 10), "log_every": 10,
                            "checkpoint_every": max(steps // 4, 1)}
    if architecture == "jumprelu":
        # short runs: Adam moves log-thresholds by ~lr per step, so thresholds need a faster lr and a wider STE
        base.update(threshold_lr_scale=15.0, bandwidth=0.1, l0_coefficient=0.3)
        if k is not None:
            base.update(target_l0=float(k), threshold_control_rate=0.05)
    base.update(overrides)
    return TrainConfig(**base)


def sae_folder(model: Any, cfg: TrainConfig, corpus: CorpusSpec) -> Path:
    """Where an SAE trained with `cfg` on `corpus` is cached (keyed by the corpus's exact tokens)."""
    s = cfg.sae
    name = f"{s.architecture}-{s.d_sae}" + (f"-k{s.k}" if s.k else "") + f"-{cfg.total_steps}x{cfg.batch_size}"
    if cfg.target_l0 is not None:
        name += f"-l0{cfg.target_l0:g}"
    return cache_dir() / "saes" / _slug(model.name) / (s.site or "site") / corpus.folder_key(model) / name


def trained_sae(model: Any, site: str = "blocks.6.resid_post", architecture: str = "topk", *, d_sae: int = 4096,
                k: int | None = 32, steps: int = 300, corpus: CorpusSpec = CorpusSpec(), progress: bool = True,
                **overrides: Any) -> SAE:
    """An SAE of `model` at `site`: loaded from the cache, or trained (and cached) on the first call."""
    s = model.site(site)
    cfg = default_train_config(s.name, architecture, model.site_width(s), d_sae, k, steps=steps,
                               model_name=model.name, **overrides)
    folder = sae_folder(model, cfg, corpus)
    if (folder / SAE_DIR / MANIFEST).exists():
        return SAE.load(folder / SAE_DIR)
    cache = corpus_activations(model, s.name, corpus, progress=progress)
    with torch.enable_grad():  # notebooks often turn gradients off globally; training needs them
        return train_sae(cfg, cache, out_dir=folder, resume=True, progress=progress).sae
