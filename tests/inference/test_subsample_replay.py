"""A data plate that subsamples itself: the model scores the rows the guide encoded.

``pyro.plate("data", N, subsample_size=B)`` draws its indices at the first plate it meets,
in the guide; the model, replayed on the guide's trace, must reuse them (as Pyro's ELBOs do)
and not draw its own. With the exact posterior as guide on a conjugate pair, z ~ N(0, 1),
x | z ~ N(z, 1), q(z | x) = N(x / 2, 1 / 2), every draw's ELBO is exactly
(N / B) * sum over the drawn rows of log N(x_i; 0, 2): no Monte-Carlo error, so the check is an
equality; scored against other rows than the guide's, it is off by several nats.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pvae.inference import ELBO

N, B = 20, 5
X = torch.linspace(-3.0, 3.0, N, dtype=torch.float64)


def _pair(drawn: list[torch.Tensor]):
    def model(x):
        with pyro.plate("data", N, subsample_size=B) as rows:
            z = pyro.sample("z", dist.Normal(torch.zeros(B, dtype=x.dtype), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[rows])

    def guide(x):
        with pyro.plate("data", N, subsample_size=B) as rows:
            drawn.append(rows.clone())
            pyro.sample("z", dist.Normal(x[rows] / 2, math.sqrt(0.5)))

    return model, guide


@pytest.mark.parametrize("fast", [False, True])
def test_model_scores_the_rows_the_guide_drew(fast):
    pyro.clear_param_store()
    drawn: list[torch.Tensor] = []
    model, guide = _pair(drawn)
    engine = ELBO(fast=fast, analytic_kl=False)  # log p(x, z) - log q(z) = log p(x) exactly
    for step in range(6):  # the fast path takes over after the first traced step
        torch.manual_seed(step)
        record = engine.train_step(model, guide, X)
        exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(X[drawn[-1]]).sum() * N / B
        assert record.loss == pytest.approx(-float(exact), rel=1e-6), step  # other rows: nats off
    if fast:
        assert engine.fast_steps == 5
