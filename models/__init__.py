"""The model zoo (installed as ``pvae.models``): one file per family."""

from .ard import ARDVAE
from .bayesian_ae import BayesianAE
from .cvae import CVAE
from .hierarchical import HierarchicalVAE
from .multimodal import MultimodalVAE
from .structured import StructuredVAE
from .vae import VAE

__all__ = [
    "ARDVAE",
    "BayesianAE",
    "CVAE",
    "HierarchicalVAE",
    "MultimodalVAE",
    "StructuredVAE",
    "VAE",
]
