"""Tracing: activation capture, interventions and the activation cache (the only code that traces).

Sites (where to read or write) live in toolkit.sites."""

from toolkit.tracing.cache import ActivationCache
from toolkit.tracing.capture import Activations, capture, iter_capture
from toolkit.tracing.fill import fill_cache
from toolkit.tracing.intervene import Ablate, Add, Edit, Replace, Splice, generate, run_with_edits
from toolkit.tracing.stream import paired_batches

__all__ = [
    "Ablate", "ActivationCache", "Activations", "Add", "Edit", "Replace", "Splice",
    "capture", "fill_cache", "paired_batches", "generate", "iter_capture", "run_with_edits",
]
