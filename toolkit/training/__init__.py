"""Training SAEs and crosscoders on one shared loop (trainer): objectives, batch sources, atomic checkpoints, the
two trainers, and the zoo of activations, SAEs and crosscoders trained once and cached."""

from toolkit.training.batches import iter_paired
from toolkit.training.crosscoder_trainer import train_crosscoder
from toolkit.training.sae_trainer import train_sae
from toolkit.training.trainer import TrainResult
from toolkit.training.zoo import (
    CorpusSpec,
    corpus_activations,
    model_activations,
    paired_activations,
    trained_crosscoder,
    trained_sae,
)

__all__ = ["CorpusSpec", "TrainResult", "corpus_activations", "iter_paired", "model_activations",
           "paired_activations", "train_crosscoder", "train_sae", "trained_crosscoder", "trained_sae"]
