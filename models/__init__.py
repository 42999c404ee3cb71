"""The model zoo (installed as ``pvae.models``): one file per family."""

from .ard import ARDVAE
from .bayesian_ae import BayesianAE
from .cvae import CVAE
from .gp_vae import GPVAE
from .hierarchical import HierarchicalVAE
from .koopman import KoopmanVAE
from .markovian_gp import MarkovianGPVAE
from .multimodal import MultimodalVAE
from .multimodal_gp import MultimodalGPVAE
from .sgpbae import SGPBAE
from .structured import StructuredVAE
from .vae import VAE

__all__ = [
    "ARDVAE",
    "BayesianAE",
    "CVAE",
    "GPVAE",
    "HierarchicalVAE",
    "KoopmanVAE",
    "MarkovianGPVAE",
    "MultimodalGPVAE",
    "MultimodalVAE",
    "SGPBAE",
    "StructuredVAE",
    "VAE",
]
