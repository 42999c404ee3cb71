"""The model zoo (installed as ``pvae.models``): one file per family."""

from .ard import ARDVAE
from .cvae import CVAE
from .hierarchical import HierarchicalVAE
from .multimodal import MultimodalVAE
from .multimodal_gp import MultimodalGPVAE
from .structured import StructuredVAE
from .vae import VAE

__all__ = [
    "ARDVAE",
    "CVAE",
    "HierarchicalVAE",
    "MultimodalGPVAE",
    "MultimodalVAE",
    "StructuredVAE",
    "VAE",
]
