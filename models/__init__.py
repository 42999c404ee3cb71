"""The model zoo (installed as ``pvae.models``): one file per family."""

from .vae import VAE

__all__ = ["VAE"]
