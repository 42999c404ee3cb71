"""``pvae compare``'s log p(x): cache-sized vectorised runs and the guide once per batch give
the numbers the traced estimator gives in runs of 100 particles (the same draws)."""

from types import SimpleNamespace

import pyro
import torch

import pvae
from pvae.app import compare, runs
from pvae.models import VAE


def test_compare_log_likelihood_keeps_the_previous_numbers():
    """The table's estimate with the new defaults against the one before them: tenths of the
    test points, 100 particles per traced run. Both draw the same normal variates (torch
    fills a tensor of them in blocks of 16, and 200 x 10 x 4 and 100 x 10 x 4 are multiples of
    16), so the per-point values agree to float32 rounding (a few ulp of ~500 nats)."""
    pyro.set_rng_seed(0)
    vae = VAE(x_dim=30, z_dim=4, hidden=(16,))
    vae.eval()
    test = (torch.rand(100, 30, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    with pyro.validation_enabled(False):
        torch.manual_seed(0)
        new = compare.log_likelihood(vae, test, 400, chunk_size=None)
        torch.manual_seed(0)
        old = torch.cat([
            pvae.log_likelihood(vae.model, vae.guide, runs.rows(test, start, start + 10),
                                num_samples=400, batch_size=10, chunk_size=100,
                                reuse_guide=False)
            for start in range(0, 100, 10)
        ])  # fmt: skip
    assert new.shape == (100,)
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-5)
    torch.manual_seed(1)  # other draws: a different estimate, so the comparison is not vacuous
    other = compare.log_likelihood(vae, test, 400)
    assert (other - old).abs().max() > 1e-3


def test_a_log_likelihood_chunk_draws_from_its_own_seed():
    """A chunk of the evaluation gives the same values whatever torch's random state before it
    (so where and in what order the chunks run does not matter), other values for another
    cell seed; every (seed, first point) has its own stream."""
    pyro.set_rng_seed(0)
    vae = VAE(x_dim=30, z_dim=4, hidden=(16,))
    vae.eval()
    ds = SimpleNamespace(
        test=(torch.rand(40, 30, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    )
    config = compare.run_config("digits", quick=True, ll_samples=50)
    task = compare.Task(compare.Cell("elbo", 0, "elbo"), "ll", 10, 20)
    with pyro.validation_enabled(False):
        torch.manual_seed(1)
        first = compare._ll_chunk(config, task, vae, ds)
        torch.manual_seed(2)
        again = compare._ll_chunk(config, task, vae, ds)
        other = compare._ll_chunk(
            config, compare.Task(compare.Cell("elbo", 1, "elbo"), "ll", 10, 20), vae, ds
        )
    assert len(first["ll"]) == 10 and first == again
    assert max(abs(a - b) for a, b in zip(first["ll"], other["ll"], strict=True)) > 1e-3
    seeds = {compare.chunk_seed(seed, start) for seed in range(3) for start in range(0, 500, 50)}
    assert len(seeds) == 30
