"""SGHMC against known posteriors: a 2-D correlated Gaussian and a conjugate Bayesian linear
regression fed in minibatches (exact mean and covariance), the N/B scale applied exactly once,
PyroSample weights of a PyroModule targeted, and the engine's arguments and state.

Tolerances: with an effective sample size ESS, a mean's Monte-Carlo error is sd / sqrt(ESS)
and a variance's relative error sqrt(2 / ESS); the step-size bias of the variance is about
eta * lambda / 4 (a few per cent at these step sizes). Each bound below is that error times
about 3-4, plus the bias.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample

import pvae
from pvae.inference import SGHMC

MEAN = torch.tensor([1.0, -2.0])
COV = torch.tensor([[1.0, 0.8], [0.8, 2.0]])


def gaussian_2d():
    pyro.sample("z", dist.MultivariateNormal(MEAN, COV))


def regression_data(n=200, d=3, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.0, -1.0, 0.5])[:d] + noise * torch.randn(n, generator=g)
    precision = torch.eye(d) + x.T @ x / noise**2  # prior N(0, I), known noise
    cov = torch.linalg.inv(precision)
    return x, y, cov @ x.T @ y / noise**2, cov


def regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


@pytest.mark.slow
def test_gaussian_2d_mean_cov_rhat():
    post = pvae.sample(
        gaussian_2d,
        sampler=SGHMC(lr=0.1),
        num_samples=2000,
        warmup=500,
        num_chains=4,
        progress=False,
    )
    z = post.flat()["z"]
    assert post.samples["z"].shape == (4, 2000, 2)
    ess = float(post.ess()["z"].min())
    assert ess > 400
    sd = COV.diag().sqrt()
    assert torch.all((z.mean(0) - MEAN).abs() < 4 * sd / ess**0.5)
    rel = (torch.cov(z.T) - COV).abs() / COV.diag().sqrt().outer(COV.diag().sqrt())
    assert float(rel.max()) < 4 * (2 / ess) ** 0.5 + 0.05
    assert float(post.rhat()["z"].max()) < 1.01


@pytest.fixture(scope="module")
def regression_posterior():
    x, y, mean, cov = regression_data()
    post = pvae.sample(
        regression,
        (x, y),
        sampler=SGHMC(),  # defaults, no tuning
        num_samples=1500,
        warmup=1000,
        num_chains=2,
        batch_size=20,
        progress=False,
    )
    return post, mean, cov


@pytest.mark.slow
def test_regression_minibatches_match_exact_posterior(regression_posterior):
    post, mean, cov = regression_posterior
    w = post.flat()["w"]
    sd = cov.diag().sqrt()
    assert torch.all((w.mean(0) - mean).abs() < 0.5 * sd), (w.mean(0), mean)
    ratio = torch.cov(w.T).diag() / cov.diag()
    assert torch.all((ratio > 0.7) & (ratio < 1.4)), ratio


@pytest.mark.slow
def test_regression_scales_data_once(regression_posterior):
    """With N/B = 10, a scale applied twice would shrink the posterior variance about 10-fold,
    and none would widen it about 10-fold: the ratio to the exact variance must be near 1."""
    post, _, cov = regression_posterior
    ratio = torch.cov(post.flat()["w"].T).diag() / cov.diag()
    assert torch.all((ratio > 10**-0.5) & (ratio < 10**0.5)), ratio
    assert torch.all((ratio > 0.7) & (ratio < 1.4)), ratio


class BayesianLinear(PyroModule):
    def __init__(self, d):
        super().__init__()
        self.linear = PyroModule[torch.nn.Linear](d, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, d]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x, y):
        weight, bias = self.linear.weight, self.linear.bias  # read outside the data plate
        with pyro.plate("data", x.shape[0]):
            loc = (x @ weight.T + bias).squeeze(-1)
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


def test_pyro_sample_weights_are_targeted():
    x, y, _, _ = regression_data(n=100, d=2)
    post = pvae.sample(
        BayesianLinear(2),
        (x, y),
        num_samples=300,
        warmup=500,
        batch_size=25,
        progress=False,
    )
    assert set(post.samples) == {"linear.weight", "linear.bias"}
    assert post.samples["linear.weight"].shape == (1, 300, 1, 2)
    assert post.samples["linear.bias"].shape == (1, 300, 1)
    # exact posterior of (w, b) with a N(0, I) prior
    features = torch.cat([x, torch.ones(100, 1)], 1)
    cov = torch.linalg.inv(torch.eye(3) + features.T @ features)
    mean = cov @ features.T @ y
    sampled = torch.cat([post.mean()["linear.weight"][0], post.mean()["linear.bias"]])
    assert torch.all((sampled - mean).abs() < 1.0 * cov.diag().sqrt()), (sampled, mean)


def test_constrained_site_sampled_in_unconstrained_space():
    def model():
        pyro.sample("s", dist.LogNormal(0.0, 0.5))

    post = pvae.sample(model, sampler=SGHMC(lr=0.1), num_samples=2000, warmup=300, progress=False)
    s = post.samples["s"]
    assert bool((s > 0).all())
    # E[log s] = 0, sd 0.5
    assert abs(float(s.log().mean())) < 0.15


def test_per_datapoint_latent_refused_when_minibatched():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.randn(40)
    with pytest.raises(ValueError, match="per-datapoint"):
        pvae.sample(model, x, num_samples=2, warmup=0, batch_size=10, progress=False)
    post = pvae.sample(model, x, num_samples=3, warmup=2, batch_size=40, progress=False)
    assert post.samples["z"].shape == (1, 3, 40)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"friction": 1.5}, ValueError, "friction"),
        ({"friction": 0}, ValueError, "friction"),
        ({"adaptive": "yes"}, TypeError, "adaptive"),
        ({"lr": "0.1"}, TypeError, "lr"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SGHMC(**kwargs)


def test_step_record_and_state_round_trip():
    sampler = SGHMC(lr=0.1)
    sampler.setup(gaussian_2d, num_warmup=5, seed=3)
    record = sampler.train_step(gaussian_2d, None)
    assert record.bound is None and record.loss == -record.log_joint
    state = sampler.state_dict()
    assert sampler.adapting
    first = [sampler.train_step(gaussian_2d, None).log_joint for _ in range(10)]
    sampler.load_state_dict(state)
    again = [sampler.train_step(gaussian_2d, None).log_joint for _ in range(10)]
    assert first == again


def test_plain_sghmc_samples_the_gaussian():
    post = pvae.sample(
        gaussian_2d,
        sampler=SGHMC(lr=0.05, adaptive=False),
        num_samples=3000,
        warmup=300,
        progress=False,
    )
    z = post.flat()["z"]
    assert torch.all((z.mean(0) - MEAN).abs() < 0.35)
    assert torch.all((torch.cov(z.T).diag() / COV.diag() - 1).abs() < 0.4)


def _coupled(d=4, rho=0.95):
    """A float64 Gaussian whose coordinates are strongly coupled: its precision matrix H."""
    cov = (1 - rho) * torch.eye(d, dtype=torch.float64) + rho * torch.ones(
        d, d, dtype=torch.float64
    )

    def model():
        pyro.sample("z", dist.MultivariateNormal(torch.zeros(d, dtype=torch.float64), cov))

    return model, torch.linalg.inv(cov)


def test_window_close_measures_the_coupled_curvature_and_caps_the_step():
    model, precision = _coupled()
    sampler = SGHMC(lr=10.0)  # a cap the step rule never reaches: only the curvature binds
    sampler.setup(model, num_warmup=200, seed=0)
    scales = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    with torch.no_grad():
        sampler.precond[0].copy_(scales)
        sampler.grad_var[0].fill_(1e-6)  # the diagonal rule alone would allow eta = lr
    root = scales.sqrt()
    exact = float(torch.linalg.eigvalsh(root[:, None] * precision * root[None, :]).max())
    state = [t.detach().clone() for t in sampler.theta]
    measured = sampler._measure_curvature(lambda: sampler._gradient(model, (), {}))
    # the power iteration's estimate of lambda_max(P^1/2 H P^1/2) (a linear gradient: the
    # finite differences are exact up to rounding), and the state left where it was
    assert measured == pytest.approx(exact, rel=0.02)
    assert all(torch.equal(a, b) for a, b in zip(state, sampler.theta, strict=True))
    sampler.adapted, sampler.curvature = True, measured
    sampler._frozen()
    # eta * lambda_max = 2, inside the stable region eta * lambda_max < 2 (2 - friction)
    assert sampler.step_size * exact == pytest.approx(2.0, rel=0.02)
    # and it is kept in the state a resume restores
    state_dict = sampler.state_dict()
    assert state_dict["curvature"] == measured


def _set_window(sampler, model, precision, scales, share):
    """Give ``sampler`` the preconditioner ``scales`` and gradient variances whose largest
    P_i V_i is ``share``; measure lambda_max(P^1/2 H P^1/2); return its exact value."""
    with torch.no_grad():
        sampler.precond[0].copy_(scales)
        sampler.grad_var[0].copy_(share / scales)
    root = scales.sqrt()
    exact = float(torch.linalg.eigvalsh(root[:, None] * precision * root[None, :]).max())
    sampler.adapted = True
    sampler.curvature = sampler._measure_curvature(lambda: sampler._gradient(model, (), {}))
    sampler._frozen()
    return exact


@pytest.mark.parametrize("ratio", [0.8, 3.0])
def test_full_batch_step_is_set_by_curvature_not_by_a_noise_bound(ratio):
    """Every step sees all the data (here: no data at all), so there is no minibatch noise to
    bound: the step is min(lr, 2 / max(lambda_max, max_i P_i V_i)), P_i V_i being the
    curvature met along the window's path (at most lambda_max for a stationary chain on a
    quadratic; larger when the gradient moved more than lambda_max explains), and nothing is
    removed from the injected noise. The former rule, min(lr, 1.2 / max_i P_i V_i, 2 /
    lambda_max), gives 1.5 / lambda_max at ratio 0.8 and 0.4 / lambda_max at ratio 3."""
    model, precision = _coupled()
    sampler = SGHMC(lr=10.0)  # lr never binds
    sampler.setup(model, num_warmup=200, seed=0)
    assert not sampler.stochastic
    scales = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    exact = _set_window(sampler, model, precision, scales, share=0.0)
    share = ratio * exact
    _set_window(sampler, model, precision, scales, share)
    assert sampler.step_size == pytest.approx(2.0 / max(exact, share), rel=0.02)
    eta = sampler._eta[0]
    assert torch.allclose(sampler._noise[0], (2 * sampler.alpha * eta).sqrt())


def test_capped_step_keeps_the_friction_per_unit_time():
    """The dynamics are a discretisation with time step sqrt(eta) and friction alpha /
    sqrt(eta) per unit time: when the curvature caps the step below the one ``friction`` was set
    for (``lr`` on full batches), the friction per step shrinks by sqrt(step / lr), so that the
    capped chain is the same process more finely discretised, not an overdamped random walk;
    the injected noise 2 alpha eta and the velocity's decay (1 - alpha) use that alpha."""
    model, precision = _coupled()
    sampler = SGHMC(lr=10.0)
    sampler.setup(model, num_warmup=200, seed=0)
    scales = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    exact = _set_window(sampler, model, precision, scales, share=0.0)
    step = sampler.step_size
    assert step == pytest.approx(2.0 / exact, rel=0.02) and step < sampler.lr
    assert sampler.alpha == pytest.approx(sampler.friction * math.sqrt(step / sampler.lr))
    eta = sampler._eta[0]
    assert torch.allclose(sampler._noise[0], (2 * sampler.alpha * eta).sqrt())
    with torch.no_grad():
        sampler.velocity[0].fill_(1.0)
        sampler._noise = [torch.zeros_like(eta)]
        before = sampler.theta[0].detach().clone()
        sampler._move((torch.zeros_like(eta),))
    assert torch.allclose(sampler.velocity[0], torch.full_like(eta, 1 - sampler.alpha))
    assert torch.allclose(sampler.theta[0].detach() - before, sampler.velocity[0])
    # where lr binds, the friction is the user's
    sampler.lr = 0.5 * step
    sampler._frozen()
    assert sampler.step_size == sampler.lr and sampler.alpha == sampler.friction


def test_minibatch_step_keeps_its_noise_bound():
    """Under minibatches the rule is unchanged: min(lr, 2 alpha c / max_i P_i V_i, 2 /
    lambda_max) with c = 2, and 15% of eta_i^2 V_i removed from the injected noise."""
    model, precision = _coupled()
    sampler = SGHMC(lr=10.0)
    sampler.setup(model, num_warmup=200, seed=0)
    sampler.stochastic = True  # as if the data plate held fewer rows than N
    scales = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    exact = _set_window(sampler, model, precision, scales, share=0.0)
    _set_window(sampler, model, precision, scales, share=0.8 * exact)
    assert sampler.step_size == pytest.approx(4 * sampler.friction / (0.8 * exact), rel=0.02)
    assert sampler.alpha == sampler.friction  # the noise bound, not the curvature, set the step
    eta, v = sampler._eta[0], sampler.grad_var[0]
    expected = (2 * sampler.friction * eta - 0.15 * eta.square() * v).clamp(min=0).sqrt()
    assert torch.allclose(sampler._noise[0], expected)


def test_curvature_measured_when_the_optimisation_ends():
    """The first window's step is capped too: lambda_max(P^1/2 H P^1/2) is measured under the
    optimiser's preconditioner at the last optimisation step, before the first window."""
    model, precision = _coupled()
    sampler = SGHMC()
    sampler.setup(model, num_warmup=200, seed=0)
    while sampler.optimising:
        assert sampler.curvature == 0.0
        sampler.train_step(model, None)
    root = sampler.precond[0].sqrt()
    exact = float(torch.linalg.eigvalsh(root[:, None] * precision * root[None, :]).max())
    # 12 power iterations: a Rayleigh quotient, below lambda_max by a few per cent at most here
    assert 0.95 * exact <= sampler.curvature <= exact * (1 + 1e-6)
    assert sampler.step_size * sampler.curvature <= 2.0 * (1 + 1e-9)
