"""Crosscoders: one sparse dictionary over two models' activations at one site (base, fine-tuned).

`crosscoder` holds the module, `loaders` reads dictionary_learning checkpoints, `paired` captures, loads and
splits paired activations, `metrics` scores a crosscoder on held-out ones. Training is in toolkit.training.
"""

from toolkit.crosscoder.crosscoder import Crosscoder, CrosscoderOutput
from toolkit.crosscoder.metrics import evaluate_crosscoder
from toolkit.crosscoder.paired import PairedActivations, capture_pair, split_paired

__all__ = ["Crosscoder", "CrosscoderOutput", "PairedActivations", "capture_pair", "evaluate_crosscoder",
           "split_paired"]
