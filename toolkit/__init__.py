"""Gemma interpretability toolkit: tracing, SAEs, crosscoders, model diffing, steering and feature analysis.

The names a notebook needs are importable from here (`from toolkit import load_model, capture, SAE`); each is
loaded on first use, so `import toolkit.models` or `import toolkit.sites` stays light. docs/architecture.md maps
the packages.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "toolkit.models": ("Model", "load_model"),
    "toolkit.sites": ("SITE_KINDS", "Site", "describe_kinds"),
    "toolkit.paths": ("cache_dir",),
    "toolkit.data": ("load_texts", "token_contexts"),
    "toolkit.config": ("CrosscoderConfig", "CrosscoderTraining", "SAEConfig", "TrainConfig"),
    "toolkit.tracing": ("Ablate", "ActivationCache", "Add", "Replace", "Splice", "capture", "fill_cache", "generate",
                        "iter_capture", "run_with_edits"),
    "toolkit.sae": ("SAE",),
    "toolkit.sae.metrics": ("evaluate_sae", "reconstruction_metrics"),
    "toolkit.sae.splice": ("generate_with_sae", "run_with_sae"),
    "toolkit.crosscoder": ("Crosscoder", "PairedActivations", "capture_pair", "evaluate_crosscoder", "split_paired"),
    "toolkit.training": ("CorpusSpec", "corpus_activations", "paired_activations", "train_crosscoder", "train_sae",
                         "trained_crosscoder", "trained_sae"),
    "toolkit.tracing.attention": ("attention_patterns",),
    "toolkit.analysis.steering": ("LatentSteer", "SteeringSpec", "VectorSteer", "diffmean", "latent_unit", "site_unit",
                                  "sweep"),
    "toolkit.analysis.attribution": ("attribute",),
    "toolkit.analysis.feature_store": ("FeatureStore", "build_feature_store", "token_latents"),
    "toolkit.analysis.probes": ("train_probe",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
