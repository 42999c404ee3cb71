"""The variational autoencoder (Kingma & Welling 2014; Rezende et al. 2014).

Generative story, for each datapoint n:

    z_n ~ N(0, I_{z_dim})
    x_n | z_n ~ p_theta(x | z_n)            (likelihood chosen by name; decoder network)

Inference network (guide):

    q_phi(z_n | x_n) = N(mu_phi(x_n), diag sigma_phi(x_n)^2)

The networks are registered with ``pyro.module`` where they are used (decoder and
likelihood in the model, encoder in the guide), so engines read the model/guide parameter
split from the traces. Both live in ``pyro.plate("data")``, so every pvae engine can train
the pair and the log-likelihood estimator can evaluate it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pvae import likelihoods, nets

from ._names import claim


class VAE(PyroModule):
    """A VAE with an MLP or small conv encoder/decoder and any likelihood of pvae.

    :param x_dim: data dimension (flattened).
    :param z_dim: latent dimension.
    :param hidden: hidden widths of the MLPs (the conv nets' dense layer uses the last one).
    :param likelihood: "bernoulli", "continuous_bernoulli", "gaussian", "poisson",
        "categorical" (see :mod:`pvae.likelihoods`; extra keywords via ``likelihood_kw``).
    :param net: "mlp" or "conv" (conv needs ``image_shape``, e.g. ``(1, 28, 28)``).
    :param activation: activation of the MLPs (``torch.nn.Tanh`` reproduces Burda et al.).
    :param name: prefix of the model's names in Pyro's parameter store. Each instance owns its
        parameters: when another live zoo model (or a stored parameter) already uses the
        prefix, this one gets ``name_1``, ``name_2``, ... (``vae._pyro_name`` is the one used).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (200, 200),
        likelihood: str = "bernoulli",
        net: str = "mlp",
        image_shape: tuple[int, int, int] | None = None,
        activation: type[torch.nn.Module] = torch.nn.ReLU,
        likelihood_kw: dict | None = None,
        name: str = "vae",
    ):
        super().__init__(claim(name, self))
        self.x_dim, self.z_dim = x_dim, z_dim
        self.likelihood = likelihoods.get(likelihood, x_dim, **(likelihood_kw or {}))
        self._likelihood_learns = any(True for _ in self.likelihood.parameters())
        self.encoder = nets.build_encoder(
            net, x_dim, z_dim, hidden, image_shape=image_shape, activation=activation
        )
        self.decoder = nets.build_decoder(
            net,
            z_dim,
            x_dim,
            tuple(reversed(hidden)),
            self.likelihood.param_size,
            image_shape=image_shape,
            activation=activation,
        )

    def _prior(self, batch_shape: torch.Size, like: torch.Tensor):
        loc = like.new_zeros(batch_shape + (self.z_dim,))
        return dist.Normal(loc, 1.0).to_event(1)

    def model(self, x: torch.Tensor) -> None:
        """p(x, z) for a batch ``x`` of shape ``(batch, x_dim)``."""
        pyro.module(f"{self._pyro_name}.decoder", self.decoder)
        if self._likelihood_learns:  # e.g. a learned Gaussian scale
            pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self._prior(x.shape[:1], x))
            pyro.sample("x", self.likelihood(self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """q(z | x) for a batch ``x`` of shape ``(batch, x_dim)``."""
        pyro.module(f"{self._pyro_name}.encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # -- conveniences (no engine needs them) --------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation, each ``(batch, z_dim)``."""
        return self.encoder(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z), shape ``(..., x_dim)``."""
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Means of p(x | z) for ``z`` drawn from the prior, ``(num_samples, x_dim)``."""
        z = torch.randn(num_samples, self.z_dim)
        return self.decode(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at the posterior mean of ``z``, shape ``(batch, x_dim)``."""
        return self.decode(self.encoder(x)[0])


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from pvae.app.registry import ModelCard  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.nets import conv_image_shape  # noqa: E402


def _build(ds: Splits, z_dim: int, hidden: Sequence[int], net: str, likelihood: str) -> VAE:
    return VAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        net=net,
        image_shape=conv_image_shape(ds, net),
    )


CARD = ModelCard(
    name="vae",
    description="variational autoencoder, Gaussian latents (Kingma & Welling 2014)",
    factory=_build,
    capabilities=("sample",),
)
