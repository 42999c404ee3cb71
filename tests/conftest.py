"""Shared fixtures: a linear-Gaussian model/guide pair written in plain Pyro, with its exact
log-likelihood and posterior: z ~ N(0, I), x | z ~ N(Wz + b, s^2 I) has
log p(x) = log N(x; b, W W^T + s^2 I) (the package's own closed forms,
``pvae.data.linear_gaussian_log_likelihood`` / ``linear_gaussian_posterior``)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pvae.data import linear_gaussian_log_likelihood, linear_gaussian_posterior


class LinearGaussian:
    """z ~ N(0, I_d), x | z ~ N(W z + b, s^2 I_D), with a Gaussian guide.

    The guide is the exact posterior when ``offset == 0`` and ``scale_factor == 1``;
    otherwise its mean is shifted by ``offset`` and its standard deviations multiplied by
    ``scale_factor`` (a deliberately wrong guide). ``full_cov=False`` uses the diagonal of
    the posterior (exact only when W has orthogonal columns).
    """

    def __init__(self, x_dim=5, z_dim=2, noise=0.7, seed=0, orthogonal=False, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(x_dim, z_dim, generator=g, dtype=dtype)
        if orthogonal:
            q, _ = torch.linalg.qr(W)
            W = q * torch.arange(2.0, 2.0 + z_dim, dtype=dtype)
        self.W, self.b = W, torch.randn(x_dim, generator=g, dtype=dtype)
        self.noise = noise
        self.z_dim, self.x_dim = z_dim, x_dim
        self.offset = 0.0
        self.scale_factor = 1.0
        self.full_cov = True

    def sample(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.z_dim, generator=g, dtype=self.W.dtype)
        return (
            z @ self.W.T
            + self.b
            + self.noise * torch.randn(n, self.x_dim, generator=g, dtype=self.W.dtype)
        )

    def log_px(self, x):
        return linear_gaussian_log_likelihood(x, self.W, self.b, self.noise)

    def posterior(self, x):
        return linear_gaussian_posterior(x, self.W, self.b, self.noise)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            loc = torch.zeros(self.z_dim, dtype=x.dtype)
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.noise).to_event(1), obs=x)

    def guide(self, x):
        mean, cov = self.posterior(x)
        mean = mean + self.offset
        with pyro.plate("data", x.shape[0]):
            if self.full_cov:
                tril = torch.linalg.cholesky(cov) * self.scale_factor
                pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=tril))
            else:
                std = cov.diagonal().sqrt() * self.scale_factor
                pyro.sample("z", dist.Normal(mean, std).to_event(1))


# Tiny networks run far faster on one thread, and the suite shares 2 cores with itself.
torch.set_num_threads(1)


@pytest.fixture
def linear_gaussian():
    return LinearGaussian()


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
