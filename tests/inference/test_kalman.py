"""KalmanELBO against closed forms: on a linear-Gaussian state-space pair with the exact
posterior as guide every bound equals the Kalman log-likelihood; with an inexact guide its
value is the ELBO's expectation with no Monte-Carlo error and its gradient is the expectation
of the ELBO's gradient; minibatch scaling is N/B. The pairs here are a user's own (plain
``pyro.param``), not a zoo model: the engine knows only the distributions."""

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pvae import ssm
from pvae.distributions import KalmanSmoothedPosterior, LinearGaussianEmission, StateSpacePrior
from pvae.inference import ELBO, IWAE, KalmanELBO
from pvae.protocol import scale_to_data

T, D, M, N = 6, 2, 3, 4


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    torch.set_default_dtype(old)
    pyro.clear_param_store()


def _setup(exact: bool):
    """A linear-Gaussian state-space pair; the guide's potentials are the emission (exact) or
    a perturbed copy of it."""
    g = torch.Generator().manual_seed(1)
    A = torch.tensor([[0.9, -0.2], [0.2, 0.9]])
    Q = torch.tensor([[0.3, 0.05], [0.05, 0.2]])
    m1, P1 = torch.tensor([0.5, -0.3]), torch.eye(D) * 1.5
    C = torch.randn(M, D, generator=g)
    d = torch.randn(M, generator=g) * 0.1
    R = torch.diag(torch.tensor([0.4, 0.3, 0.5]))
    y = torch.randn(N, T, M, generator=g)
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 2] = mask[1, 4:] = False
    y[~mask] = float("nan")  # hidden steps may hold anything
    shift = 0.0 if exact else 0.5

    def prior():
        return StateSpacePrior(
            pyro.param("A", A.clone()), pyro.param("Q", Q.clone()), m1, P1, num_steps=T
        )

    def model(y, mask):
        C_ = pyro.param("C", C.clone())
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", prior())
            pyro.sample("y", LinearGaussianEmission(z, C_, d, R, mask=mask, latent_site="z"), obs=y)

    def guide(y, mask):
        shift_ = pyro.param("shift", torch.tensor(shift))
        C_ = pyro.param("C", C.clone())
        potentials = torch.where(mask[..., None], y - d + shift_, torch.zeros_like(y))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("z", KalmanSmoothedPosterior(prior(), potentials, C_, R * 1.5**shift, mask))

    log_likelihood = ssm.kalman_smoother(
        torch.where(mask[..., None], y - d, torch.zeros_like(y)), A, Q, C, R, m1, P1, mask=mask
    ).log_normalizer
    return model, guide, (y, mask), log_likelihood


def test_truth_every_bound_equals_the_kalman_log_likelihood():
    """Exact posterior as guide: log p(y, z) - log q(z) = log p(y) for every z, so the ELBO
    with Monte-Carlo KL (analytic_kl=False) and IWAE are exact too; KalmanELBO is exact by
    construction."""
    model, guide, args, log_likelihood = _setup(exact=True)
    truth = float(log_likelihood.sum())
    for engine in (KalmanELBO(), ELBO(analytic_kl=False), IWAE(num_particles=7)):
        assert -engine.loss(model, guide, *args) == pytest.approx(truth, abs=1e-6)


def test_value_is_the_elbo_expectation_with_zero_variance():
    model, guide, args, log_likelihood = _setup(exact=False)
    kalman = [-KalmanELBO().loss(model, guide, *args) for _ in range(3)]
    assert max(kalman) - min(kalman) < 1e-9  # zero variance: no Monte-Carlo draw involved
    assert kalman[0] < float(log_likelihood.sum()) - 0.1  # a strict bound for this guide
    # the Monte-Carlo ELBO (analytic KL, same pair) averages to it; 4 standard errors
    draws = torch.tensor([-ELBO().loss(model, guide, *args) for _ in range(400)])
    error = float(draws.std()) / 400**0.5
    assert float(draws.std()) > 0.1
    assert abs(float(draws.mean()) - kalman[0]) < 4 * error


def test_gradient_is_the_expected_elbo_gradient():
    """d KalmanELBO / d(A, C, shift) equals the mean of 20,000 vectorised ELBO particles'
    gradients (Monte-Carlo error well below the 2% tolerance: checked against the spread of
    the per-batch estimates)."""
    model, guide, args, _ = _setup(exact=False)
    names = ("A", "C", "shift")

    def gradient(engine):
        pyro.clear_param_store()
        loss = engine.differentiable_loss(model, guide, *args)
        params = [pyro.param(name).unconstrained() for name in names]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    exact = gradient(KalmanELBO())
    batches = torch.stack([gradient(ELBO(num_particles=5000)) for _ in range(4)])
    mean, spread = batches.mean(0), batches.std(0) / 2
    assert (mean - exact).abs().max() < 4 * spread.max() + 1e-3
    torch.testing.assert_close(mean, exact, rtol=0.02, atol=0.02 * float(exact.abs().max()))
    # a broken engine (no exact expectation, one draw) is visibly different
    assert (gradient(KalmanELBO(exact_emissions=False)) - exact).abs().max() > 0.05


def test_minibatch_scaling_counts_sequences_n_over_b():
    model, guide, (y, mask), _ = _setup(exact=False)
    full = -KalmanELBO().loss(model, guide, y[:2], mask[:2])
    scaled = -KalmanELBO().loss(scale_to_data(model, 10), scale_to_data(guide, 10), y[:2], mask[:2])
    assert scaled == pytest.approx(5 * full, rel=1e-12)


def test_neural_emission_uses_smoothed_draws():
    """A non-linear emission: KalmanELBO averages draws and agrees with the ELBO in mean."""
    model, guide, args, _ = _setup(exact=False)

    def tanh_model(y, mask):
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample(
                "z",
                StateSpacePrior(
                    torch.eye(D) * 0.9, torch.eye(D) * 0.3, torch.zeros(D), torch.eye(D), T
                ),
            )
            loc = torch.tanh(z) @ torch.ones(D, M)
            obs = pyro.distributions.Normal(loc, 0.5).to_event(1).mask(mask).to_event(1)
            pyro.sample("y", obs, obs=torch.nan_to_num(y))

    kalman = torch.tensor(
        [-KalmanELBO(num_particles=50).loss(tanh_model, guide, *args) for _ in range(20)]
    )
    elbo = torch.tensor([-ELBO(num_particles=50).loss(tanh_model, guide, *args) for _ in range(20)])
    error = (kalman.var() / 20 + elbo.var() / 20).sqrt()
    assert abs(float(kalman.mean() - elbo.mean())) < 4 * float(error) + 1e-9


def test_errors_name_what_is_wrong():
    def plain_model(y, mask):
        with pyro.plate("data", y.shape[0]):
            pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))

    def plain_guide(y, mask):
        with pyro.plate("data", y.shape[0]):
            pyro.sample("w", pyro.distributions.Normal(0.0, 2.0))

    model, guide, args, _ = _setup(exact=True)
    with pytest.raises(ValueError, match="KalmanSmoothedPosterior"):
        KalmanELBO().loss(plain_model, plain_guide, *args)

    def wrong_site(y, mask):
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample(
                "z", StateSpacePrior(torch.eye(D), torch.eye(D), torch.zeros(D), torch.eye(D), T)
            )
            emission = LinearGaussianEmission(
                z, torch.ones(M, D), torch.zeros(M), torch.eye(M), mask, "x"
            )
            pyro.sample("y", emission, obs=y)

    with pytest.raises(ValueError, match="'x'"):
        KalmanELBO().loss(wrong_site, guide, *args)
    with pytest.raises(ValueError, match="mask"):
        LinearGaussianEmission(
            torch.zeros(T, D), torch.ones(M, D), torch.zeros(M), torch.eye(M), torch.ones(T)
        )
    with poutine.block(), pytest.raises(ValueError, match="num_particles"):
        KalmanELBO(num_particles=0)
