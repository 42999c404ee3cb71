"""The ARD-VAE: automatic relevance determination of latent dimensions (Saha et al. 2025).

Generative story, for each datapoint n, with a hierarchical prior on the latent scales:

    alpha_d ~ Gamma(a0, b0),  a0 = b0 = 0                 (the non-informative limit)
    z_n | alpha ~ prod_d N(0, 1 / alpha_d)
    x_n | z_n ~ p_theta(x | z_n)                          (likelihood chosen by name; decoder)

Inference network (guide): q_phi(z_n | x_n) = N(mu_phi(x_n), diag sigma_phi(x_n)^2).

The prior variances v_d = 1 / alpha_d are not trained by gradients. Once per epoch they are
re-estimated from encoded data (the posterior mode of alpha under a0 = b0 = 0): encode a
held-out set with one sample each, z_n ~ q(z | x_n), and set

    v_d = mean_n z_{n,d}^2.

Between updates v is held fixed, so the training loss is the beta-ELBO with prior N(0, v):

    loss = -E_q log p(x | z) + beta * sum_d 0.5 * [(mu_d^2 + sigma_d^2) / v_d
                                                  - log sigma_d^2 + log v_d - 1].

The variances alone do not say which dimensions are used (an unused dimension whose posterior
equals its prior keeps whatever v_d it has). The relevance score weighs each variance by how
strongly the decoder's mean reacts to the dimension,

    score_d = v_d * sum_i ( mean_n | d xhat_i / d mu_d (x_n) | )^2,

and the relevant dimensions are the fewest whose scores reach 99% of the total.

Design: v is a ``pyro.param`` (``"<name>.prior_variance"``, positive) that the model reads
detached, so no gradient ever reaches it (optimisers skip it) while ``pvae.fit`` saves it with
the other parameters: checkpoints carry it and resume stays exact. The update runs from a
``pvae.fit`` callback, :meth:`ARDVAE.prior_callback`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints, transform_to

from pvae.diagnostics.relevance import relevance_scores, relevant_set
from pvae.evaluate import Data, iter_batches, num_items

from .vae import VAE

__all__ = ["ARDVAE", "Relevance"]


@dataclass
class Relevance:
    """What :meth:`ARDVAE.relevance` returns.

    ``scores``: ``(z_dim,)`` relevance score per dimension; ``relevant``: ``(z_dim,)`` boolean
    mask of the fewest dimensions whose scores reach ``mass`` of the total; ``count``: how many
    are relevant; ``mass``: the share used (0.99).
    """

    scores: torch.Tensor
    relevant: torch.Tensor
    count: int
    mass: float


class ARDVAE(VAE):
    """A VAE whose prior variances are re-estimated from encoded data (ARD).

    :param x_dim: data dimension (flattened).
    :param z_dim: latent dimension (an upper bound: ARD switches off what is not needed).
    :param hidden: hidden widths of the MLPs; ``()`` gives linear encoder and decoder.
    :param likelihood: a name of :mod:`pvae.likelihoods` (extra keywords via ``likelihood_kw``).
    :param activation: activation of the MLPs.
    :param min_variance: floor of the re-estimated prior variances (keeps N(0, v) proper).

    Train it with any engine and re-estimate the prior once per epoch::

        ard = ARDVAE(x_dim=20, z_dim=8, hidden=(), likelihood="gaussian")
        pvae.fit(ard.model, ard.guide, ds.train, callbacks=[ard.prior_callback(ds.valid)])
        ard.relevance(ds.valid).count
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (200, 200),
        likelihood: str = "gaussian",
        activation: type[torch.nn.Module] = torch.nn.ReLU,
        likelihood_kw: dict | None = None,
        min_variance: float = 1e-6,
        name: str = "ard",
    ):
        if not min_variance > 0:
            raise ValueError(f"min_variance must be positive, got {min_variance!r}")
        super().__init__(
            x_dim,
            z_dim,
            hidden,
            likelihood,
            activation=activation,
            likelihood_kw=likelihood_kw,
            name=name,
        )
        self.min_variance = float(min_variance)

    # -- the prior variances ------------------------------------------------------------------
    @property
    def _variance_name(self) -> str:
        return f"{self._pyro_name}.prior_variance"

    def _variance_param(self) -> torch.Tensor:
        dtype = next(self.encoder.parameters()).dtype  # float64 after .double()
        return pyro.param(
            self._variance_name,
            lambda: torch.ones(self.z_dim, dtype=dtype),
            constraint=constraints.positive,
        )

    @property
    def prior_variance(self) -> torch.Tensor:
        """The current prior variances ``v``, ``(z_dim,)`` (a detached copy)."""
        return self._variance_param().detach().clone()

    @torch.no_grad()
    def update_prior(self, data: Data, batch_size: int = 1000) -> torch.Tensor:
        """Re-estimate ``v_d = mean_n z_{n,d}^2`` with one draw ``z_n ~ q(z | x_n)`` per row.

        :param data: ``(N, x_dim)`` held-out data (or a tuple/Dataset whose first item is it).
        :returns: the new variances ``(z_dim,)``.

        The parameter is changed in place, so an optimiser holding it and the next checkpoint
        see the new value. Draws come from torch's global random stream.
        """
        if num_items(data) < 1:
            raise ValueError("update_prior needs at least one datapoint")
        total = torch.zeros(self.z_dim, dtype=self._variance_param().dtype)
        count = 0
        for batch in iter_batches(data, batch_size):
            loc, scale = self.encoder(batch[0])
            z = loc + scale * torch.randn_like(loc)
            total += z.pow(2).sum(0)
            count += z.shape[0]
        variance = (total / count).clamp(min=self.min_variance)
        unconstrained = self._variance_param().unconstrained()  # type: ignore[attr-defined]
        unconstrained.copy_(transform_to(constraints.positive).inv(variance))
        return variance

    def prior_callback(self, data: Data) -> Callable[[Any, dict[str, Any]], None]:
        """A ``pvae.fit`` callback that calls :meth:`update_prior` on ``data`` every epoch."""

        def callback(run: Any, epoch_record: dict[str, Any]) -> None:
            self.update_prior(data)

        return callback

    # -- the prior: N(0, v), v held fixed between updates ---------------------------------
    def _prior(self, batch_shape: torch.Size, like: torch.Tensor):
        scale = self._variance_param().detach().sqrt().to(like.dtype)
        return dist.Normal(like.new_zeros(batch_shape + (self.z_dim,)), scale).to_event(1)

    # -- relevance ----------------------------------------------------------------------------
    @torch.no_grad()
    def relevance(self, data: Data, mass: float = 0.99, batch_size: int = 1000) -> Relevance:
        """Score every latent dimension and pick the relevant ones.

        ``score_d = v_d * sum_i (mean_n |d xhat_i / d mu_d|)^2`` with ``xhat`` the mean of
        p(x | z) at ``z = mu(x_n)``; the relevant set is the fewest dimensions whose scores
        reach ``mass`` of the total.

        :param data: ``(N, x_dim)`` data (or a tuple/Dataset whose first item is it).
        :param mass: share of the total score the relevant set must reach, in (0, 1].
        """
        if not 0 < mass <= 1:
            raise ValueError(f"mass must be in (0, 1], got {mass!r}")
        n = num_items(data)
        if n < 1:
            raise ValueError("relevance needs at least one datapoint")

        def mean_x(z: torch.Tensor) -> torch.Tensor:
            return self.likelihood.mean(self.decoder(z))

        abs_jacobian = torch.zeros(self.x_dim, self.z_dim)  # sum_n |d xhat_i / d mu_d|
        for batch in iter_batches(data, batch_size):
            loc = self.encoder(batch[0])[0]
            for d in range(self.z_dim):
                tangent = torch.zeros_like(loc)
                tangent[:, d] = 1.0
                derivative = torch.func.jvp(mean_x, (loc,), (tangent,))[1]  # (B, x_dim)
                abs_jacobian[:, d] += derivative.abs().sum(0)
        scores = relevance_scores(self.prior_variance, (abs_jacobian / n).T)
        order, _, count = relevant_set(scores, mass)
        relevant = torch.zeros(self.z_dim, dtype=torch.bool)
        relevant[order[:count]] = True
        return Relevance(scores, relevant, count, float(mass))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Means of p(x | z) for ``z ~ N(0, v)``, ``(num_samples, x_dim)``."""
        z = torch.randn(num_samples, self.z_dim) * self.prior_variance.sqrt()
        return self.decode(z)


# ---------------------------------------------------------------------------------------------
# The model card: what `pvae` reads of this family (see pvae.app.registry)
# ---------------------------------------------------------------------------------------------

from pvae.app.registry import ModelCard, Option, Real  # noqa: E402
from pvae.data import Splits  # noqa: E402
from pvae.nets import require_mlp  # noqa: E402


def _build(
    ds: Splits, z_dim: int, hidden: Sequence[int], net: str, likelihood: str, min_variance: float
) -> ARDVAE:
    require_mlp("ard", net)
    return ARDVAE(
        x_dim=ds.x_dim,
        z_dim=z_dim,
        hidden=tuple(hidden),
        likelihood=likelihood,
        min_variance=min_variance,
    )


CARD = ModelCard(
    name="ard",
    description="VAE with an ARD prior re-estimated every epoch (Saha et al. 2025)",
    factory=_build,
    options=(Option.of(ARDVAE, "min_variance", Real(0.0, open_below=True)),),
    capabilities=("sample",),
    callbacks=lambda model, ds: [model.prior_callback(ds.valid)],
)
