"""Train once, then load: activations, SAEs and crosscoders for the embedded models, cached in the user cache.

No pretrained SAEs exist offline for the default model. Everything here lives under `toolkit.paths.cache_dir()`,
keyed by model, site, tokens and settings; a killed run resumes from its last checkpoint on the next call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from toolkit.config import CrosscoderConfig, CrosscoderTraining, SAEConfig, TrainConfig
from toolkit.crosscoder import Crosscoder, PairedActivations
from toolkit.data import load_texts, token_contexts
from toolkit.io import MANIFEST
from toolkit.keys import model_fingerprint, stable_hash
from toolkit.paths import activations_dir, crosscoders_dir, saes_dir, slug
from toolkit.sae.sae import SAE
from toolkit.tracing import ActivationCache, fill_cache
from toolkit.tracing.cache import contexts_fingerprint
from toolkit.tracing.fill import cache_config
from toolkit.training.crosscoder_trainer import CROSSCODER_DIR, train_crosscoder
from toolkit.training.sae_trainer import SAE_DIR, train_sae

if TYPE_CHECKING:
    from toolkit.models import Model
    from toolkit.sites import Site


@dataclass(frozen=True)
class CorpusSpec:
    """Which tokens to read: the offline default corpus (or another `load_texts` source) cut into contexts."""

    source: str = "default"
    ctx_len: int = 128
    n_contexts: int = 1024

    def contexts(self, model: Model) -> torch.Tensor:
        return token_contexts(model.tokenizer, load_texts(self.source), self.ctx_len, n_contexts=self.n_contexts)

    @property
    def key(self) -> str:
        return f"{slug(self.source)}-ctx{self.ctx_len}-n{self.n_contexts}"

    def folder_key(self, model: Model, contexts: torch.Tensor | None = None) -> str:
        """`key` plus the fingerprint of the exact tokens: a changed corpus or tokenizer never reuses a cache."""
        contexts = self.contexts(model) if contexts is None else contexts
        return f"{self.key}-{contexts_fingerprint(contexts)[:12]}"


def _activations_key(model: Model, site: Site, contexts: torch.Tensor, dtype: torch.dtype) -> str:
    """Hash of everything an activation cache's contents depend on: its full CacheConfig (model name, site, widths,
    exact tokens, shard size, storage dtype, BOS handling), the model's weights and its compute dtype."""
    cfg = cache_config(model, [site], contexts, None, 64, dtype, False)
    return stable_hash({"cache": cfg.to_dict(), "model": model_fingerprint(model)})[:12]


def _cached_activations(model: Model, site: Site, contexts: torch.Tensor, folder: Path, *, batch_size: int,
                        progress: bool, dtype: torch.dtype) -> ActivationCache:
    if (folder / MANIFEST).exists():
        cache = ActivationCache.open(folder, verify=False)
        if cache.complete:
            return cache
    return fill_cache(model, site, contexts, folder, resume=folder.exists(), batch_size=batch_size,
                      progress=progress, dtype=dtype)


def corpus_activations(model: Model, site: str, corpus: CorpusSpec = CorpusSpec(), *, progress: bool = True,
                       dtype: torch.dtype = torch.float32) -> ActivationCache:
    """The activation cache of `model` at `site` over `corpus` (BOS dropped), filled once and reused."""
    s = model.site(site)
    contexts = corpus.contexts(model)
    key = f"{corpus.folder_key(model, contexts)}-{_activations_key(model, s, contexts, dtype)}"
    folder = activations_dir() / slug(model.name) / s.name / key
    return _cached_activations(model, s, contexts, folder, batch_size=8, progress=progress, dtype=dtype)


def model_activations(model: Model, site: str, contexts: torch.Tensor, *, batch_size: int = 8,
                      progress: bool = True, dtype: torch.dtype = torch.float32) -> ActivationCache:
    """The activation cache of `model` at `site` on token `contexts`, keyed by everything its contents depend on
    (exact tokens, storage dtype, the model's weights and compute dtype); filled once and reused."""
    s = model.site(site)
    key = f"ctx{contexts.shape[1]}-n{contexts.shape[0]}-{_activations_key(model, s, contexts, dtype)}"
    folder = activations_dir() / slug(model.name) / s.name / key
    return _cached_activations(model, s, contexts, folder, batch_size=batch_size, progress=progress, dtype=dtype)


def paired_activations(base: Model, ft: Model, site: str, contexts: torch.Tensor, *, batch_size: int = 8,
                       progress: bool = True) -> PairedActivations:
    """Both models' activations at `site` on the same `contexts` (each cached by `model_activations`), row-aligned."""
    caches = [model_activations(m, site, contexts, batch_size=batch_size, progress=progress) for m in (base, ft)]
    return PairedActivations.from_caches(*caches, tokens=contexts)


def trained_crosscoder(cfg: CrosscoderConfig, train: PairedActivations, *, progress: bool = True,
                       **training: Any) -> Crosscoder:
    """A crosscoder trained with `cfg` and CrosscoderTraining(**training) on `train`: loaded from the user cache
    when the same settings already ran on the same activations, else trained (resumably) and cached."""
    tr = CrosscoderTraining(**training)
    digest = hashlib.sha256(json.dumps([cfg.to_dict(), dataclasses.asdict(tr)], sort_keys=True).encode())
    digest.update(train.acts.detach().cpu().contiguous().numpy().tobytes())  # the exact training data
    pair = "__".join(slug(m) for m in (cfg.models or ("unknown", "unknown")))
    name = f"{cfg.architecture}-{cfg.d_sae}" + (f"-k{cfg.k}" if cfg.k else "") + f"-{tr.n_steps}-{digest.hexdigest()[:12]}"
    folder = crosscoders_dir() / pair / (cfg.site or "site") / name
    if (folder / CROSSCODER_DIR / MANIFEST).is_file():
        return Crosscoder.load(folder / CROSSCODER_DIR)
    return train_crosscoder(cfg, train, tr, out_dir=folder, resume=True, progress=progress).crosscoder


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


def sae_folder(model: Model, cfg: TrainConfig, corpus: CorpusSpec) -> Path:
    """Where an SAE trained with `cfg` on `corpus` is cached: a readable name plus a hash of the full TrainConfig
    (every field: lr, seed, schedule, ...) and the model's weights, so other settings never reuse it."""
    s = cfg.sae
    name = f"{s.architecture}-{s.d_sae}" + (f"-k{s.k}" if s.k else "") + f"-{cfg.total_steps}x{cfg.batch_size}"
    name += "-" + stable_hash({"train": cfg.to_dict(), "model": model_fingerprint(model)})[:12]
    return saes_dir() / slug(model.name) / (s.site or "site") / corpus.folder_key(model) / name


def trained_sae(model: Model, site: str = "blocks.6.resid_post", architecture: str = "topk", *, d_sae: int = 4096,
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
