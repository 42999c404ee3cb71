"""The importance-sampled log-likelihood against the exact log p(x) of a linear-Gaussian VAE."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import LinearGaussian

import pvae


@pytest.mark.parametrize("num_samples", [1, 7, 100])
@pytest.mark.parametrize("full_cov", [True, False])
def test_exact_posterior_gives_exact_log_likelihood(linear_gaussian, num_samples, full_cov):
    lg = linear_gaussian
    if not full_cov:  # a mean-field guide is exact when W has orthogonal columns
        lg = type(lg)(orthogonal=True)
        lg.full_cov = False
    x = lg.sample(30)
    estimate = pvae.log_likelihood(lg.model, lg.guide, x, num_samples=num_samples, chunk_size=3)
    assert estimate.shape == (30,)
    torch.testing.assert_close(estimate, lg.log_px(x), rtol=0, atol=1e-9)


def test_wrong_guide_gap_shrinks_with_num_samples(linear_gaussian):
    lg = linear_gaussian
    lg.offset, lg.scale_factor = 0.3, 1.3
    x = lg.sample(40)
    exact = lg.log_px(x)
    gaps = []
    for k in [1, 10, 100, 1000, 5000]:
        torch.manual_seed(k)
        estimate = pvae.log_likelihood(lg.model, lg.guide, x, num_samples=k, batch_size=20)
        gaps.append((exact - estimate).mean().item())
    # The expected gap falls like Var(w) / 2K: ~1e-4 nats from K = 1000 on, where the Monte-Carlo
    # error of the mean over 40 points (~3e-3) dominates; 0.01 allows 3 standard errors.
    assert gaps[0] > 0.1, gaps
    assert all(a >= b - 0.01 for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[1] < gaps[0] / 2 and gaps[2] < gaps[1] / 2, gaps
    assert abs(gaps[-1]) < 0.02, gaps


def test_chunking_does_not_change_the_estimate(linear_gaussian):
    lg = linear_gaussian
    lg.offset, lg.scale_factor = 0.1, 1.2
    x = lg.sample(10)
    torch.manual_seed(0)
    a = pvae.log_likelihood(lg.model, lg.guide, x, num_samples=64, chunk_size=64, batch_size=10)
    torch.manual_seed(0)
    b = pvae.log_likelihood(lg.model, lg.guide, x, num_samples=64, chunk_size=64, batch_size=10)
    torch.testing.assert_close(a, b)
    # Other chunks draw other samples: with K = 2000 the per-point Monte-Carlo standard error
    # is ~0.01 nats here (sqrt(Var(w / p(x)) / K)), so 0.06 is a 5-sigma bound.
    exact = lg.log_px(x)
    for chunk_size, batch_size in [(2000, 10), (7, 3)]:
        estimate = pvae.log_likelihood(
            lg.model, lg.guide, x, num_samples=2000, chunk_size=chunk_size, batch_size=batch_size
        )
        assert (estimate - exact).abs().max() < 0.06


def test_global_latent_is_refused():
    import pyro
    import pyro.distributions as dist

    def model(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(theta, 1.0), obs=x)

    def guide(x):
        pyro.sample("theta", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'theta' is outside the 'data' plate"):
        pvae.log_likelihood(model, guide, torch.zeros(4), num_samples=2)


def test_missing_data_plate_is_refused():
    import pyro
    import pyro.distributions as dist

    def model(x):
        pyro.sample("x", dist.Normal(0.0, 1.0).expand(x.shape).to_event(1), obs=x)

    def guide(x):
        pass

    with pytest.raises(ValueError, match="pyro.plate\\('data'"):
        pvae.log_likelihood(model, guide, torch.zeros(4), num_samples=2)


# ---- log_likelihood without vectorised particles ---------------------------------------------


class BankNormal(dist.Normal):
    """A Normal whose reparameterised draws take the next rows of a fixed bank of noise, one
    row (batch, z_dim) per particle: a vectorised run of k particles and k single runs then
    see the same noise in the same order."""

    bank: torch.Tensor
    used = 0

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        rows = shape.numel() // self.bank[0].numel()
        eps = BankNormal.bank[BankNormal.used : BankNormal.used + rows].reshape(shape)
        BankNormal.used += rows
        return self.loc + self.scale * eps


def test_log_likelihood_loops_over_particles_with_the_same_draws():
    lg = LinearGaussian(orthogonal=True)
    x = lg.sample(6)
    mean, cov = lg.posterior(x)

    def guide(x):  # a wrong guide, so the estimate depends on the draws
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", BankNormal(mean + 0.3, 1.4 * cov.diagonal().sqrt()).to_event(1))

    BankNormal.bank = torch.randn(100, 6, 2, generator=torch.Generator().manual_seed(0))
    estimates = {}
    for vectorize in (True, False):
        BankNormal.used = 0
        estimates[vectorize] = pvae.log_likelihood(
            lg.model, guide, x, num_samples=40, chunk_size=16, vectorize_particles=vectorize,
            reuse_guide=False,  # the bank is not torch's stream: count the traced runs' draws
        )  # fmt: skip
        # one draw for the data checks, one to read the plates, then 40 particles
        assert BankNormal.used == 42
    torch.testing.assert_close(estimates[False], estimates[True], rtol=0, atol=1e-12)
    assert (estimates[True] - lg.log_px(x)).abs().max() > 1e-3  # the draws matter


def test_chunks_are_pooled_over_all_samples():
    """Same draws, different chunkings: the K log-weights of a datapoint are pooled into one
    log-mean-exp, so every chunking gives the same value (to rounding); averaging per-chunk
    estimates instead would change with the chunk size."""
    lg = LinearGaussian(orthogonal=True)
    x = lg.sample(6)
    mean, cov = lg.posterior(x)

    def guide(x):  # a poor guide: the log-weights spread widely
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", BankNormal(mean + 0.8, 2.0 * cov.diagonal().sqrt()).to_event(1))

    BankNormal.bank = torch.randn(200, 6, 2, generator=torch.Generator().manual_seed(1))
    estimates = []
    for chunk_size in (40, 16, 7, 1):
        BankNormal.used = 0
        estimates.append(  # the traced runs (the bank is not torch's random stream)
            pvae.log_likelihood(
                lg.model, guide, x, num_samples=40, chunk_size=chunk_size, reuse_guide=False
            )
        )
    for estimate in estimates[1:]:
        torch.testing.assert_close(estimate, estimates[0], rtol=0, atol=1e-10)
    # ... and equals the log-mean-exp of the 40 log-weights computed by hand.
    q = dist.Normal(mean + 0.8, 2.0 * cov.diagonal().sqrt())
    z = q.loc + q.scale * BankNormal.bank[2:42]  # rows 0, 1: the data checks, the plates
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(z @ lg.W.T + lg.b, lg.noise).log_prob(x).sum(-1)
        - q.log_prob(z).sum(-1)
    )
    pooled = torch.logsumexp(log_w, 0) - math.log(40)
    torch.testing.assert_close(estimates[0], pooled, rtol=0, atol=1e-10)
    averaged = log_w.mean(0)  # what averaging the chunk-1 estimates would give
    assert (pooled - averaged).min() > 0.5


def test_poor_guide_with_one_sample_chunks_still_pools():
    """With chunks of one sample, averaging per-chunk estimates gives the ELBO: under this
    guide it sits ~1 nat below log p(x) (measured), while the pooled IWAE_K estimate with
    K = 2000 stays within 0.08 nats of it over 8 seeds (measured)."""
    lg = LinearGaussian(orthogonal=True)
    lg.full_cov = False
    lg.offset, lg.scale_factor = 0.25, 1.2
    x = lg.sample(5)
    exact = lg.log_px(x)
    torch.manual_seed(0)
    estimate = pvae.log_likelihood(lg.model, lg.guide, x, num_samples=2000, chunk_size=1)
    assert (exact - estimate).abs().max() < 0.25
    torch.manual_seed(0)
    elbo = torch.stack(
        [pvae.log_likelihood(lg.model, lg.guide, x, num_samples=1) for _ in range(200)]
    ).mean(0)
    assert (exact - elbo).mean() > 0.6  # the guide is poor enough for the difference to show
