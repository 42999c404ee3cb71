"""The model zoo (installed as ``pvae.models``): one file per family."""

from .cvae import CVAE
from .hierarchical import HierarchicalVAE
from .multimodal import MultimodalVAE
from .vae import VAE

__all__ = ["CVAE", "HierarchicalVAE", "MultimodalVAE", "VAE"]
