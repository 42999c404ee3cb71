"""Shared pairs for the reliability tests: a user's own pair whose data plate may be renamed
or left out, with a Gaussian or Bernoulli likelihood."""

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn


class Pair:
    def __init__(self, x_dim=6, z_dim=2, plate="data", likelihood="normal", seed=0):
        torch.manual_seed(seed)
        self.z_dim, self.plate, self.likelihood = z_dim, plate, likelihood
        self.encoder = nn.Linear(x_dim, 2 * z_dim)
        self.decoder = nn.Linear(z_dim, x_dim)

    def _plate(self, x):
        return pyro.plate(self.plate, x.shape[0]) if self.plate else contextlib.nullcontext()

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with self._plate(x):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            if self.likelihood == "bernoulli":
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)
            else:
                pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with self._plate(x):
            loc, raw = self.encoder(x).chunk(2, -1)
            scale = nn.functional.softplus(raw) + 1e-3
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


@pytest.fixture(autouse=True)
def _fresh_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture
def x():
    return torch.randn(64, 6, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def binary():
    return (torch.rand(64, 6, generator=torch.Generator().manual_seed(0)) > 0.5).float()


@pytest.fixture
def make_pair():
    """The :class:`Pair` class (tests build pairs with their own options)."""
    return Pair
