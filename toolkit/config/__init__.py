"""Frozen configuration dataclasses, one per job; per-field rules in tables, cross-field checks in __post_init__."""

from toolkit.config.cache import CacheConfig
from toolkit.config.crosscoder import CROSSCODER_ARCHITECTURES, CrosscoderConfig, CrosscoderTraining
from toolkit.config.optimization import Optimization
from toolkit.config.sae import SAE_ARCHITECTURES, SAEConfig
from toolkit.config.train import TrainConfig

__all__ = ["CROSSCODER_ARCHITECTURES", "SAE_ARCHITECTURES", "CacheConfig", "CrosscoderConfig", "CrosscoderTraining", "Optimization", "SAEConfig", "TrainConfig"]
