"""MarkovianGPVAE: the O(T) prior and smoothed guide against dense GPs, bounds, training."""

from __future__ import annotations

import pyro
import pytest
import torch

from pvae import data, gp
from pvae.diagnostics import active_units
from pvae.inference import ELBO, IWAE, KalmanELBO
from pvae.models import MarkovianGPVAE
from pvae.models.markovian_gp import matern_transitions
from tests.core.test_gp_ssm import dense_kernel, dense_regression

NUS = [0.5, 1.5, 2.5]
LENGTHSCALES = (0.4, 1.5)
VARIANCES = (0.8, 2.0)


def _set_hyper_parameters(model: MarkovianGPVAE) -> None:
    with torch.no_grad():
        ls = torch.tensor(LENGTHSCALES, dtype=torch.float64) - 1e-4
        var = torch.tensor(VARIANCES, dtype=torch.float64) - 1e-6
        model.gp.lengthscale_raw.copy_(ls.expm1().log())
        model.gp.variance_raw.copy_(var.expm1().log())


def _irregular(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    times = (torch.rand(B, T, generator=g, dtype=torch.float64) + 0.05).cumsum(-1)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return times, mask


@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("nu", NUS)
def test_smoothed_posterior_equals_dense_gp_regression(nu, method):
    """Encoder potentials N(loc_t | f_t, scale_t^2) on irregular stamps with missing frames:
    the smoothed means and marginal variances of f, and log Z = log N(loc | 0, K + diag(v)),
    equal dense GP regression per channel and sequence (float64, 1e-8)."""
    B, T, L = 2, 14, 2
    model = MarkovianGPVAE(x_dim=3, z_dim=L, nu=nu, hidden=(8,), method=method).double()
    _set_hyper_parameters(model)
    times, mask = _irregular(B, T, seed=1)
    g = torch.Generator().manual_seed(2)
    loc = torch.randn(B, T, L, generator=g, dtype=torch.float64)
    scale = 0.2 + torch.rand(B, T, L, generator=g, dtype=torch.float64)
    q = model.smoothed(loc, scale, times, mask)
    mean, var = q.mean[..., :L], q.variance[..., :L]
    for b in range(B):
        log_z = 0.0
        for c in range(L):
            K = dense_kernel(nu, times[b], LENGTHSCALES[c], VARIANCES[c])
            noise = scale[b, :, c] ** 2
            m, v = dense_regression(K, loc[b, :, c], noise, mask[b])
            torch.testing.assert_close(mean[b, :, c], m, rtol=0, atol=1e-8)
            torch.testing.assert_close(var[b, :, c], v, rtol=0, atol=1e-8)
            o = mask[b]
            cov = K[o][:, o] + torch.diag(noise[o])
            zero = torch.zeros(int(o.sum()), dtype=torch.float64)
            mvn = torch.distributions.MultivariateNormal(zero, cov)
            log_z += float(mvn.log_prob(loc[b, o, c]))
        assert float(q.smoother.log_normalizer[b].detach()) == pytest.approx(log_z, abs=1e-8)


def _dense_log_likelihood(model, values, times, mask) -> float:
    """log p(y) of the linear-Gaussian model: Cov(y_t, y_s) = sum_l C_l C_l^T K_l(t, s) + R."""
    C = model.decoder.weight.detach()
    c = model.decoder.bias.detach()
    R = torch.diag(model.likelihood.scale.detach().expand(C.shape[0]) ** 2)
    total = 0.0
    for b in range(values.shape[0]):
        T, M = values.shape[1:]
        cov = torch.kron(torch.eye(T, dtype=torch.float64), R)
        for l in range(C.shape[1]):
            K = dense_kernel(model.gp.nu, times[b], LENGTHSCALES[l], VARIANCES[l])
            cov = cov + torch.kron(K, torch.outer(C[:, l], C[:, l]))
        keep = mask[b].repeat_interleave(M)
        y = (values[b] - c).reshape(-1)[keep]
        zero = torch.zeros(len(y), dtype=torch.float64)
        total += float(torch.distributions.MultivariateNormal(zero, cov[keep][:, keep]).log_prob(y))
    return total


@pytest.mark.parametrize("nu", [0.5, 2.5])
def test_exact_potentials_bounds_equal_dense_log_likelihood(nu):
    """Linear-Gaussian decoder, exact potentials: ELBO (Monte-Carlo KL), IWAE and KalmanELBO
    all equal the dense multi-output GP log p(y) on irregular stamps with missing frames."""
    B, T, M = 2, 9, 3
    model = MarkovianGPVAE(
        x_dim=M, z_dim=2, nu=nu, likelihood="gaussian", net="linear", exact_potentials=True
    ).double()
    _set_hyper_parameters(model)
    times, mask = _irregular(B, T, seed=3)
    values = torch.randn(B, T, M, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    values[~mask] = float("nan")  # hidden frames may hold anything
    truth = _dense_log_likelihood(model, values, times, mask)
    for engine in (KalmanELBO(), ELBO(analytic_kl=False), IWAE(num_particles=3)):
        value = -engine.loss(model.model, model.guide, values, times, mask)
        assert value == pytest.approx(truth, abs=1e-6), type(engine).__name__


def _held_out_bound(model, split) -> float:
    model.eval()
    pyro.set_rng_seed(1)
    value = -KalmanELBO(num_particles=20).loss(model.model, model.guide, *split) / len(split[0])
    model.train()
    return value


@pytest.mark.parametrize("engine", ["elbo", "iwae"])
def test_trains_on_rotating_digits(engine):
    """A few Adam steps on a small subset (40% of frames missing) improve the held-out
    bound; missing frames are neither encoded nor scored."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    ds = data.load("rotating-digits", sizes=(32, 16, 1), num_steps=10, irregular=True)
    model = MarkovianGPVAE(x_dim=ds.x_dim, z_dim=3, hidden=(64,), lengthscale=3.0)
    loss = ELBO() if engine == "elbo" else IWAE(num_particles=4)
    before = _held_out_bound(model, ds.valid)
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    for _ in range(25):
        svi.step(*ds.train)
    after = _held_out_bound(model, ds.valid)
    assert after > before + 5.0, (before, after)
    lengthscale = model.gp.lengthscale()
    assert lengthscale.shape == (3,) and bool((lengthscale != 3.0).all())  # learned


def test_channel_diagnostics_and_conveniences():
    ds = data.load("rotating-digits", sizes=(4, 1, 1), num_steps=6)
    model = MarkovianGPVAE(x_dim=ds.x_dim, z_dim=2, nu=1.5, hidden=(16,))
    # the smoothed guide's KL does not separate over channels; its means do
    units = active_units(model.guide, ds.train, site="z", channels={"z": -1})
    assert units.variances.shape == (4,)  # two GP values, then their two derivatives
    mean, var = model.encode(*ds.train)
    assert mean.shape == var.shape == (4, 6, 2)
    filled = model.impute(*ds.train)
    values, _, mask = ds.train
    assert filled.shape == values.shape and torch.equal(filled[mask], values[mask])
    assert model.sample(torch.arange(5.0), num_samples=3).shape == (3, 5, ds.x_dim)


def test_shared_and_missing_times():
    """times None means 0..T-1; a (T,) grid is shared; the same numbers either way."""
    model = MarkovianGPVAE(x_dim=4, z_dim=2, hidden=(8,)).double()
    values = torch.rand(3, 5, 4, dtype=torch.float64)
    grid = torch.arange(5.0, dtype=torch.float64)
    a = model.encode(values)[0]
    b = model.encode(values, grid.expand(3, 5))[0]
    torch.testing.assert_close(a, b)


def test_bad_input_is_refused():
    model = MarkovianGPVAE(x_dim=4, z_dim=2, hidden=(8,))
    values = torch.rand(2, 5, 4)
    times = torch.arange(5.0).expand(2, 5).clone()
    with pytest.raises(ValueError, match="increase strictly"):
        bad = times.clone()
        bad[1, 3] = bad[1, 2]
        model.guide(values, bad)
    with pytest.raises(ValueError, match="times must have shape"):
        model.model(values, times[:, :4])
    with pytest.raises(TypeError, match="times must be a floating-point"):
        model.model(values, torch.arange(5).expand(2, 5))
    with pytest.raises(ValueError, match="values must have shape"):
        model.model(torch.rand(2, 5, 3), times)
    with pytest.raises(ValueError, match="mask must have shape"):
        model.model(values, times, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="nu must be one of"):
        MarkovianGPVAE(x_dim=4, nu=2.0)
    with pytest.raises(ValueError, match="exact_potentials"):
        MarkovianGPVAE(x_dim=4, exact_potentials=True)
    with pytest.raises(ValueError, match="lengthscale must be finite and greater than 0.0001"):
        MarkovianGPVAE(x_dim=4, lengthscale=0.0)


@pytest.mark.parametrize("nu", NUS)
def test_closed_form_transitions_equal_the_matrix_exponential(nu):
    """A, Q, P_inf of the closed-form exponential equal pvae.gp.matern_discretisation's
    (Padé matrix exponential) to rounding, values and gradients, over short and long gaps."""
    g = torch.Generator().manual_seed(int(2 * nu))
    lengthscale = torch.tensor(LENGTHSCALES, dtype=torch.float64, requires_grad=True)
    variance = torch.tensor(VARIANCES, dtype=torch.float64, requires_grad=True)
    gaps = (1e-3 + 4 * torch.rand(3, 1, 9, generator=g, dtype=torch.float64)).requires_grad_()
    leaves = (lengthscale, variance, gaps)
    results = []
    for fn in (gp.matern_discretisation, matern_transitions):
        out = fn(nu, lengthscale, variance, gaps)
        weights = [torch.randn(v.shape, generator=g.manual_seed(1), dtype=v.dtype) for v in out]
        loss = sum((v * w).sum() for v, w in zip(out, weights, strict=True))
        results.append((*out, *torch.autograd.grad(loss, leaves)))
    for mine, pade in zip(*results, strict=True):
        torch.testing.assert_close(mine, pade, rtol=1e-10, atol=1e-12)
