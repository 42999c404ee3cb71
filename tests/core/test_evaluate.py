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


# ---- the guide once per batch (reuse_guide) -------------------------------------------------


class CountingGuide:
    """A guide that counts its runs."""

    def __init__(self, guide):
        self.guide, self.calls = guide, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.guide(*args, **kwargs)


def second_moment_of_weights(lg, x):
    """E_q[(p(z | x) / q(z | x))^2] per datapoint, exactly, for a mean-field Gaussian guide
    N(m + offset, (s * f)^2) against the diagonal posterior N(m, s^2) (orthogonal W): per
    dimension, with a = 1/s1^2, b = 1/(2 s2^2), c = a - b > 0,
    s2 / (sqrt(2) s1^2 sqrt(c)) * exp(a b (m1 - m2)^2 / c); the product over dimensions."""
    mean, cov = lg.posterior(x)
    s1 = cov.diagonal().sqrt()
    s2 = s1 * lg.scale_factor
    a, b = 1 / s1**2, 1 / (2 * s2**2)
    c = a - b
    per_dim = s2 / (math.sqrt(2) * s1**2 * c.sqrt()) * torch.exp(a * b * lg.offset**2 / c)
    return per_dim.prod().expand(x.shape[0])


def test_reused_guide_draws_the_traced_particles_and_is_unbiased():
    """The guide-once path against the traced path (same seed: the same draws, so the same
    estimate to rounding) and against the exact log p(x) of a linear-Gaussian model with a
    wrong guide, within 5 standard errors of the estimator (computed from the exact variance
    of the normalised weights, Var = E[w^2] - 1: SD ~ sqrt(Var / K) per point, bias ~ -Var/2K).
    """
    lg = LinearGaussian(orthogonal=True)
    lg.full_cov = False
    lg.offset, lg.scale_factor = 0.15, 1.2  # Var(w / p(x)) = 0.55
    x = lg.sample(40)
    exact = lg.log_px(x)
    estimates, calls = {}, {}
    for reuse in (True, False):
        guide = CountingGuide(lg.guide)
        torch.manual_seed(0)
        estimates[reuse] = pvae.log_likelihood(
            lg.model, guide, x, num_samples=2000, batch_size=20, chunk_size=10, reuse_guide=reuse
        )
        calls[reuse] = guide.calls
    assert calls[False] >= 2 * 200  # traced: the guide runs once per run of 10 particles
    assert calls[True] < 20  # reused: the data checks, the plates, once per batch, the check
    torch.testing.assert_close(estimates[True], estimates[False], rtol=0, atol=1e-10)
    var = second_moment_of_weights(lg, x) - 1
    assert 0.1 < float(var[0]) < 1  # a wrong guide, and the delta method's regime
    bias, se = -var / (2 * 2000), (var / 2000).sqrt()
    error = estimates[True] - exact
    assert (error - bias).abs().max() < 5 * se.max()  # per point
    se_mean = float(var.sum().sqrt() / 2000**0.5 / x.shape[0])
    assert abs(float((error - bias).mean())) < 5 * se_mean
    assert 5 * se_mean < 0.02  # the mean's band (0.013 nats) resolves a 0.02-nat error


def test_reused_guide_with_one_particle_per_run():
    lg = LinearGaussian(orthogonal=True)
    lg.full_cov = False
    lg.offset = 0.2
    x = lg.sample(6)
    estimates = {}
    for reuse in (True, False):
        torch.manual_seed(3)
        estimates[reuse] = pvae.log_likelihood(
            lg.model, lg.guide, x, num_samples=30, vectorize_particles=False, reuse_guide=reuse
        )
    torch.testing.assert_close(estimates[True], estimates[False], rtol=0, atol=1e-10)


def dependent_pair(noise_in_guide=False):
    """z1 ~ N(0, 1), z2 | z1 ~ N(z1, 1), x | z2 ~ N(z2, 0.5^2) per dimension (D = 3), so
    x ~ N(0, 2.25) exactly; the guide draws z2 around its draw of z1 (a dependent guide), and
    with ``noise_in_guide`` also perturbs its mean with torch's random stream."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z2, 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = 0.4 * x
            if noise_in_guide:
                loc = loc + 0.1 * torch.randn(x.shape)
            z1 = pyro.sample("z1", dist.Normal(loc, 0.9).to_event(1))
            pyro.sample("z2", dist.Normal(0.5 * z1 + 0.4 * x, 0.6).to_event(1))

    return model, guide


@pytest.mark.parametrize("noise_in_guide", [False, True])
def test_reused_guide_falls_back_where_it_does_not_apply(noise_in_guide):
    """A guide whose second latent depends on the first's draw, or that draws random numbers
    outside its sample sites, cannot be run once per batch: the first run's check sees it
    and the whole call is traced, with the traced path's draws (the same values as
    ``reuse_guide=False``)."""
    model, guide = dependent_pair(noise_in_guide)
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.5
    estimates, calls = {}, {}
    for reuse in (True, False):
        counting = CountingGuide(guide)
        torch.manual_seed(0)
        estimates[reuse] = pvae.log_likelihood(
            model, counting, x, num_samples=300, batch_size=4, chunk_size=10, reuse_guide=reuse
        )
        calls[reuse] = counting.calls
    assert calls[True] >= 60  # traced: once per run of 10 particles, 30 runs per batch
    torch.testing.assert_close(estimates[True], estimates[False], rtol=0, atol=1e-10)
    exact = dist.Normal(0.0, 1.5).log_prob(x).sum(-1)
    assert (estimates[True] - exact).abs().max() < 0.3  # a sane estimate (K = 300)


def test_reuse_guide_must_be_a_bool(linear_gaussian):
    x = linear_gaussian.sample(3)
    with pytest.raises(TypeError, match="reuse_guide must be True or False"):
        pvae.log_likelihood(
            linear_gaussian.model, linear_gaussian.guide, x, num_samples=2, reuse_guide="yes"
        )
