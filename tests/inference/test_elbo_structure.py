"""What an engine keeps between steps (its plate nesting, the pair it last traced) never
changes a step: a reused engine gives bit-identical losses, bounds, gradients and records to a
fresh engine, which reads everything anew, over steps whose structure changes (latent size,
batch size, a latent's own scale, scaling to the data or not, one or three particles).

A cache of the per-step structure checks (data frame, scaled latents) keyed by the traces'
structure was tried for the ELBO step and dropped: building and hashing the key (19 us) cost
more than the checks it saved (14 us). This test is what any such cache must pass.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints

import pvae
from pvae.inference import ELBO
from pvae.protocol import SCALED_LATENTS

NUM_DATA = 50
Z_MAX, X_DIM = 4, 3


def model(x, z_dim, z_scale=1.0):
    w = pyro.param("w", torch.linspace(-1.0, 1.0, Z_MAX * X_DIM).reshape(Z_MAX, X_DIM))
    with pyro.plate("data", x.shape[0]):
        with poutine.scale(scale=z_scale):
            prior = dist.Normal(x.new_zeros(x.shape[0], z_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
        pyro.sample("x", dist.Normal(z @ w[:z_dim], 0.5).to_event(1), obs=x)


def guide(x, z_dim, z_scale=1.0):
    a = pyro.param("a", torch.linspace(-0.3, 0.3, X_DIM * Z_MAX).reshape(X_DIM, Z_MAX))
    s = pyro.param("s", torch.full((Z_MAX,), 0.7), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        with poutine.scale(scale=z_scale):
            pyro.sample("z", dist.Normal(x @ a[:, :z_dim], s[:z_dim]).to_event(1))


TRAIN_MODEL = pvae.scale_to_data(model, NUM_DATA)
TRAIN_GUIDE = pvae.scale_to_data(guide, NUM_DATA)

# (batch rows, latent size, the latent's own scale, scaled to NUM_DATA): the structure changes
# at every step and comes back to earlier ones. Unscaled to the data, batches of 5 and 7
# differ only in their plate's size (the sites' scales are all 1).
STEPS = [
    (5, 2, 1.0, True),
    (5, 4, 1.0, True),
    (7, 4, 1.0, True),
    (5, 2, 0.5, True),
    (5, 2, 1.0, True),
    (7, 4, 1.0, True),
    (5, 4, 1.0, False),
    (7, 4, 1.0, False),
    (5, 2, 1.0, False),
]


def one_step(engine, rows, z_dim, z_scale, to_data, seed):
    """The record and the gradients of one training step on a fixed batch and seed."""
    x = torch.linspace(-2.0, 2.0, rows * X_DIM).reshape(rows, X_DIM)
    pair = (TRAIN_MODEL, TRAIN_GUIDE) if to_data else (model, guide)
    pyro.set_rng_seed(seed)
    record = engine.train_step(*pair, x, z_dim, z_scale=z_scale)
    params = dict(pyro.get_param_store().named_parameters())
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return record, grads


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("analytic_kl", [True, False])
def test_reused_engine_steps_match_fresh_engines(num_particles, analytic_kl):
    pyro.clear_param_store()
    reused = ELBO(num_particles=num_particles, analytic_kl=analytic_kl, max_plate_nesting=1)
    for seed, step in enumerate(STEPS):
        fresh = ELBO(num_particles=num_particles, analytic_kl=analytic_kl, max_plate_nesting=1)
        got, got_grads = one_step(reused, *step, seed)
        want, want_grads = one_step(fresh, *step, seed)
        assert got.loss == want.loss and got.bound == want.bound  # bit-identical floats
        assert got.extras == want.extras
        assert (got.extras.get("bound_source") == SCALED_LATENTS) == (step[2] != 1.0)
        assert got_grads.keys() == want_grads.keys() == {"w", "a", "s"}
        for name, grad in got_grads.items():
            assert torch.equal(grad, want_grads[name]), name
