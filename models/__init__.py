"""The model zoo (installed as ``pvae.models``): one file per family."""

from .cvae import CVAE
from .hierarchical import HierarchicalVAE
from .vae import VAE

__all__ = ["CVAE", "HierarchicalVAE", "VAE"]
