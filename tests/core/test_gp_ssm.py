"""Matérn SDEs (pvae.gp) against dense GPs with gpytorch's kernels, float64, 1e-8."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from pvae import gp

NUS = [0.5, 1.5, 2.5]
METHODS = ["sequential", "parallel"]


def _times(T: int, seed: int = 0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Irregular stamps: gaps uniform in [0.02, 1.02)."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.rand(*batch, T, generator=g, dtype=torch.float64) + 0.02
    return gaps.cumsum(-1)


def dense_kernel(nu: float, times: torch.Tensor, lengthscale: float, variance: float):
    """gpytorch's ScaleKernel(MaternKernel(nu)) as a dense (T, T) matrix."""
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=nu)).double()
    # float64 values: a Python float would be stored through a float32 tensor
    kernel.base_kernel.lengthscale = torch.tensor(float(lengthscale), dtype=torch.float64)
    kernel.outputscale = torch.tensor(float(variance), dtype=torch.float64)
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
        return kernel(times[:, None]).to_dense()


def dense_log_prob(nu, y, times, lengthscale, variance, noise=0.0):
    K = dense_kernel(nu, times, lengthscale, variance)
    T = len(times)
    cov = K + noise * torch.eye(T, dtype=K.dtype)
    with (
        gpytorch.settings.max_cholesky_size(10**6),
        gpytorch.settings.fast_computations(False, False, False),
    ):
        mvn = gpytorch.distributions.MultivariateNormal(torch.zeros(T, dtype=K.dtype), cov)
        return mvn.log_prob(y)


def dense_regression(K, y, noise, observed):
    """Posterior means and marginal variances of f given y_o = f_o + e, e ~ N(0, diag(noise_o))."""
    o = observed.nonzero().squeeze(-1)
    Koo = K[o][:, o] + torch.diag(noise[o])
    Kfo = K[:, o]
    mean = Kfo @ torch.linalg.solve(Koo, y[o])
    cov = K - Kfo @ torch.linalg.solve(Koo, Kfo.T)
    return mean, cov.diagonal()


@pytest.mark.parametrize("nu", NUS)
def test_stationary_covariance_solves_the_lyapunov_equation(nu):
    """P_inf is stationary: F P_inf + P_inf F^T + L q L^T = 0 (white noise enters the last
    coordinate only, L = e_d), so Q = P_inf - A P_inf A^T >= 0; and the implied covariance
    H expm(F dt) P_inf H^T is gpytorch's Matérn kernel at lag dt."""
    lengthscale = torch.tensor(0.7, dtype=torch.float64)
    variance = torch.tensor(1.3, dtype=torch.float64)
    drift, stationary = gp.matern_sde(nu, lengthscale, variance)
    lyapunov = drift @ stationary + stationary @ drift.mT
    assert float(lyapunov[-1, -1]) < 0
    lyapunov[-1, -1] = 0.0
    torch.testing.assert_close(lyapunov, torch.zeros_like(lyapunov), rtol=0, atol=1e-12)
    gaps = torch.tensor([0.05, 0.3, 2.0], dtype=torch.float64)
    A, Q, P = gp.matern_discretisation(nu, lengthscale, variance, gaps)
    assert torch.linalg.eigvalsh(Q).min() > -1e-12
    lagged = (A @ P)[..., 0, 0]
    times = torch.cat([torch.zeros(1, dtype=torch.float64), gaps])
    K = dense_kernel(nu, times, 0.7, 1.3)
    torch.testing.assert_close(lagged, K[0, 1:], rtol=0, atol=1e-12)
    assert float(P[0, 0]) == pytest.approx(1.3, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nu", NUS)
def test_prior_log_density_equals_dense_gp(nu, method):
    """log N(f | 0, K) on irregular stamps: the O(T) filter equals gpytorch's dense MVN."""
    T = 25
    times = _times(T, seed=1)
    y = torch.randn(T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lengthscale, variance = 0.8, 1.7
    truth = dense_log_prob(nu, y, times, lengthscale, variance)
    value = gp.matern_log_marginal(
        nu,
        y,
        times,
        torch.tensor(lengthscale, dtype=torch.float64),
        torch.tensor(variance, dtype=torch.float64),
        method=method,
    )
    assert float(value) == pytest.approx(float(truth), abs=1e-8)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nu", NUS)
def test_regression_equals_dense_gp_regression(nu, method):
    """Posterior means and marginal variances of f with noisy, partly missing observations."""
    T = 20
    g = torch.Generator().manual_seed(3)
    times = _times(T, seed=4)
    y = torch.randn(T, generator=g, dtype=torch.float64)
    noise = 0.05 + torch.rand(T, generator=g, dtype=torch.float64)
    observed = torch.rand(T, generator=g) > 0.3
    K = dense_kernel(nu, times, 1.1, 0.9)
    mean_truth, var_truth = dense_regression(K, y, noise, observed)
    y_missing = torch.where(observed, y, torch.full_like(y, float("nan")))
    mean, var = gp.matern_regression(
        nu,
        y_missing,
        times,
        torch.tensor(1.1, dtype=torch.float64),
        torch.tensor(0.9, dtype=torch.float64),
        noise,
        mask=observed,
        method=method,
    )
    torch.testing.assert_close(mean, mean_truth, rtol=0, atol=1e-8)
    torch.testing.assert_close(var, var_truth, rtol=0, atol=1e-8)


def test_batched_hyper_parameters_are_independent_gps():
    """A batch of (lengthscale, variance) pairs on a batch of grids is one GP per entry."""
    times = _times(10, seed=5, batch=(3,))
    y = torch.randn(3, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ls = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    var = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    value = gp.matern_log_marginal(1.5, y, times, ls, var, noise=0.1)
    for i in range(3):
        truth = dense_log_prob(1.5, y[i], times[i], float(ls[i]), float(var[i]), noise=0.1)
        assert float(value[i]) == pytest.approx(float(truth), abs=1e-8)


def test_gradients_reach_the_hyper_parameters():
    times = _times(12, seed=7)
    y = torch.randn(12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ls = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    var = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda a, b: gp.matern_log_marginal(2.5, y, times, a, b, noise=0.2), (ls, var)
    )


def test_bad_input_is_refused():
    ls = torch.tensor(1.0)
    with pytest.raises(ValueError, match="nu must be one of"):
        gp.matern_sde(1.0, ls, ls)
    with pytest.raises(ValueError, match="increase strictly"):
        gp.check_times(torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        gp.check_times(torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError, match="floating-point"):
        gp.check_times(torch.arange(3))
    with pytest.raises(ValueError, match="values must have shape"):
        gp.matern_log_marginal(0.5, torch.zeros(4), torch.arange(3.0), ls, ls)
