import pytest

from toolkit.config import SAEConfig
from toolkit.sae.sae import SAE

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="package")
def tiny_sae():
    """A random ReLU SAE on the tiny Gemma-2's last residual stream (width 64 -> 48 latents)."""
    return SAE.from_config(SAEConfig(d_in=64, d_sae=48, architecture="relu", site=SITE), seed=0)
