"""SGHMC's defaults on conjugate Bayesian linear regressions (known Gaussian posteriors),
called exactly as the README's ``pvae.sample`` snippet: default ``SGHMC()``, 4 chains, default
``warmup`` and ``num_samples``, minibatches of 100 or 50.

Bands, from the Monte-Carlo error: with a bulk ESS of E, a posterior mean's standard error is
sd / sqrt(E) and a posterior sd's relative standard error about 1 / sqrt(2 E). Each test first
asserts E >= 150 for every coordinate; there the mean band (0.3 sd) is 3.7 standard errors and
the sd band (20%) 3.5 standard errors (at the ESS these runs reach, 180-310, 4.0 and 3.8). The
remaining room covers the sampler's biases (step size and uncompensated minibatch noise: sd
ratios 0.92-1.04 measured on these problems over seeds 0-3, Monte-Carlo error included). With
the old defaults (uniform start, frozen Springenberg preconditioner) these runs gave R-hat
1.6-4.6, sds up to 19x too wide and means up to 21 posterior sd off.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae

MIN_ESS = 150


def conjugate_problem(n, d, noise, prior, rho=0.0, seed=0, span=1.0):
    """Data, model and exact posterior (mean, covariance) of w ~ N(0, prior^2 I),
    y ~ N(x w, noise^2); features with equicorrelation ``rho``, feature j scaled by
    ``span ** (j / (d - 1))`` (scales from 1 to ``span``; the true weights divided by them)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, 1, generator=g)
    x = rho**0.5 * common + (1 - rho) ** 0.5 * torch.randn(n, d, generator=g)
    scales = torch.tensor(float(span)) ** (torch.arange(d) / max(d - 1, 1))
    x = x * scales
    y = x @ (torch.linspace(-1.0, 1.5, d) / scales) + noise * torch.randn(n, generator=g)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, prior).expand([d]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, noise), obs=y)

    precision = torch.eye(d) / prior**2 + x.T @ x / noise**2
    cov = torch.linalg.inv(precision)
    return model, x, y, cov @ x.T @ y / noise**2, cov


def check_against_exact(post, mean, cov):
    w = post.flat()["w"]
    ess = post.ess()["w"]
    assert float(ess.min()) >= MIN_ESS, ess
    assert float(post.rhat()["w"].max()) < 1.05, post.rhat()["w"]
    sd = cov.diag().sqrt()
    ratio = w.std(0) / sd
    assert torch.all((ratio > 0.8) & (ratio < 1.2)), ratio
    error = (w.mean(0) - mean) / sd
    assert torch.all(error.abs() < 0.3), error


@pytest.mark.slow
def test_equicorrelated_regression_n1000_d5():
    model, x, y, mean, cov = conjugate_problem(1000, 5, noise=1.0, prior=10.0, rho=0.5)
    post = pvae.sample(
        model, (x, y), sampler=pvae.inference.SGHMC(), num_chains=4, batch_size=100, seed=0
    )
    check_against_exact(post, mean, cov)


@pytest.mark.slow
def test_regression_n500_d3_small_noise():
    model, x, y, mean, cov = conjugate_problem(500, 3, noise=0.5, prior=10.0)
    post = pvae.sample(
        model, (x, y), sampler=pvae.inference.SGHMC(), num_chains=4, batch_size=100, seed=1
    )
    check_against_exact(post, mean, cov)


@pytest.mark.slow
def test_regression_n400_d3_batch50_unit_prior():
    model, x, y, mean, cov = conjugate_problem(400, 3, noise=1.0, prior=1.0)
    post = pvae.sample(
        model, (x, y), sampler=pvae.inference.SGHMC(), num_chains=4, batch_size=50, seed=2
    )
    check_against_exact(post, mean, cov)


@pytest.mark.slow
def test_plain_sghmc_full_batch_regime():
    """The plain sampler (identity mass, step lr / N) is exact up to its discretisation bias
    (about lr / 4 of the variance here) when every step sees all the data. One chain of 2000
    draws; bands: ESS >= 100, mean within 0.4 sd (4 standard errors), sd within 25% (3.5
    standard errors plus the bias)."""
    model, x, y, mean, cov = conjugate_problem(200, 3, noise=1.0, prior=1.0, seed=3)
    post = pvae.sample(
        model,
        (x, y),
        sampler=pvae.inference.SGHMC(lr=0.05, adaptive=False),
        num_samples=2000,
        warmup=300,
        batch_size=200,
        seed=0,
        progress=False,
    )
    w = post.flat()["w"]
    assert float(post.ess()["w"].min()) >= 100
    sd = cov.diag().sqrt()
    assert torch.all(((w.mean(0) - mean) / sd).abs() < 0.4)
    ratio = w.std(0) / sd
    assert torch.all((ratio > 0.75) & (ratio < 1.25)), ratio


@pytest.mark.slow
def test_full_batch_equicorrelated_regression():
    """Every step sees all 1000 datapoints (rho = 0.8: posterior correlations about -0.24,
    lambda_max(P^1/2 H P^1/2) about 20): no minibatch noise, so the step is min(lr, 2 /
    max(lambda_max, max_i P_i V_i)) with no noise bound, and the default call mixes (measured:
    R-hat 1.026, ESS 235, sd ratios 0.94-1.05, mean errors within 0.15 sd); the bands as above."""
    model, x, y, mean, cov = conjugate_problem(1000, 5, noise=1.0, prior=10.0, rho=0.8)
    sampler = pvae.inference.SGHMC()
    post = pvae.sample(model, (x, y), sampler=sampler, num_chains=4, batch_size=1000, seed=0)
    check_against_exact(post, mean, cov)
    share = float((sampler.precond[0] * sampler.grad_var[0]).max())
    expected = min(sampler.lr, 2.0 / max(sampler.curvature, share))
    assert sampler.step_size == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known: the window's shrinkage towards an absolute 1e-3")
def test_full_batch_badly_scaled_regression():
    """Full batches, features scaled from 1 to 100 (posterior sds from 3e-2 to 3e-4). A known
    failure of the adaptive warm-up, kept as a strict xfail so that a fix shows up: each
    window's variance is shrunk towards an absolute 1e-3 (Stan's rule), 5 / (n + 5) of it, about
    1e-5 for the last window, 100 times the stiffest weight's posterior variance (1e-7): P is
    100x too large there, lambda_max(P^1/2 H P^1/2) about 100 caps the step at 0.007-0.013 and
    the loosest weights barely move (seeds 0-3: R-hat 1.12-1.77, bulk ESS 6-36, sd ratios
    0.95-1.34, mean errors up to 0.92 sd). Shrinking towards 1 / E[g_i^2] instead (with the
    first preconditioner's 1% floor lowered to 1e-6) gave seeds 0 and 3 a preconditioner within
    0.9-1.9 of the posterior variances and the step at ``lr``, but bulk ESS 16, 11, 78, 274 on
    seeds 0-3 (one chain left behind; on seeds 1-2 a window's variance, taken while the chain
    still drifted, set the loosest weight's P 17-47x too large): not kept. P_i =
    sqrt(Var theta_i / Var g_i) over the window passed here (seeds 0-3: R-hat 1.014-1.021, ESS
    270-317, P within 1% of the posterior variances) but failed the rho = 0.8 test above (ESS
    68, seed 0); the larger of it and the window variance passed both (seeds 0-1: R-hat 1.015-1.020,
    ESS 275-341) but made a Bayesian autoencoder's chains explode at every lr; capped at 4
    times the window variance, it failed here again (seed 0: R-hat 1.49, ESS 8): not kept.
    Keeping the friction per unit time when the curvature caps the step (SGHMC's friction
    rule) leaves it failing (seed 0: R-hat 1.30, ESS 11; friction 0.05: 1.25, ESS 27)."""
    model, x, y, mean, cov = conjugate_problem(1000, 5, noise=1.0, prior=10.0, span=100.0)
    sampler = pvae.inference.SGHMC()
    post = pvae.sample(model, (x, y), sampler=sampler, num_chains=4, batch_size=1000, seed=0)
    check_against_exact(post, mean, cov)
