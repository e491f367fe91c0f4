"""Jupyter widgets over toolkit.analysis results: they hold no model, take arrays and the caller's functions.

    FeatureExplorer     every SAE latent: list, search, histograms, shaded contexts, logit lens, text box
    ModelDiffExplorer   crosscoder latents: norm-difference histogram with brush, Latent Scaling scatter
    SteeringPanel       steer with latents and vectors mixed; unsteered vs steered; sweep; copy as code
"""

from widgets._base import MAX_PAYLOAD_BYTES, PayloadError
from widgets.feature_explorer import FeatureExplorer
from widgets.model_diff import ModelDiffExplorer
from widgets.steering_panel import SteeringPanel

__all__ = ["MAX_PAYLOAD_BYTES", "FeatureExplorer", "ModelDiffExplorer", "PayloadError", "SteeringPanel"]
