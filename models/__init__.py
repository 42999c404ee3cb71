"""The model zoo (installed as ``pvae.models``): one file per family."""

from .ard import ARDVAE
from .cvae import CVAE
from .hierarchical import HierarchicalVAE
from .koopman import KoopmanVAE
from .multimodal import MultimodalVAE
from .structured import StructuredVAE
from .vae import VAE

__all__ = [
    "ARDVAE",
    "CVAE",
    "HierarchicalVAE",
    "KoopmanVAE",
    "MultimodalVAE",
    "StructuredVAE",
    "VAE",
]
