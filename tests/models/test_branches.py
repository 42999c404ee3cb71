"""Options off the default path, each run once against an exact reference.

- a particle loop (``vectorize_particles=False``) of KalmanELBO, IWAE and the ELBO on a pair
  with per-step (time-varying) transitions ``A_t, Q_t``: every bound equals the dense joint
  Gaussian's ``log p(y)``; ``pvae.log_likelihood``'s one-particle-per-run loop on a sequence
  pair gives the dense ``log p(y_n)``;
- a fixed non-unit and a learned Gaussian likelihood scale in StructuredVAE (linear-Gaussian
  emission with ``R = s^2 I``, and an MLP decoder scored by hand);
- MarkovianGPVAE's neural decoder and ``encode`` read the GP values ``z[..., :L]``, not the
  derivatives, checked on a state whose derivative components differ from its values;
- forecast horizons above one (StructuredVAE) against the exact Kalman prediction
  ``C A^k E[z_T | y] + d`` from the dense conditional, MarkovianGPVAE's imputation of a
  trailing gap of 3 frames against the dense multi-output GP conditional, and the Koopman
  predictive loss at horizon 3 against a hand loop with matrix powers;
- the multimodal GP's Markovian (OU) prior: log density, smoothed posterior and KL against the
  dense Ornstein-Uhlenbeck kernel ``exp(-|t - t'| / l)``.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

import pvae
from pvae.distributions import KalmanSmoothedPosterior, LinearGaussianEmission, StateSpacePrior
from pvae.inference import ELBO, IWAE, KalmanELBO
from pvae.models import MarkovianGPVAE, StructuredVAE
from pvae.models.koopman import predictive_loss
from pvae.models.multimodal_gp import MarkovianPrior
from tests.core.test_gp_ssm import dense_kernel

T, D, M, N = 6, 2, 3, 3


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    torch.set_default_dtype(old)
    pyro.clear_param_store()


# -- dense references --------
def _dense_state(A: torch.Tensor, Q: torch.Tensor, m1: torch.Tensor, P1: torch.Tensor, T: int):
    """Mean ``(T D,)`` and covariance ``(T D, T D)`` of ``z_1..z_T`` for per-step ``A, Q``
    ``(T-1, D, D)``: ``Cov(z_i, z_j) = A_i ... A_{j+1} P_j`` for ``i >= j``."""
    D = m1.shape[-1]
    means, margs = [m1], [P1]
    for t in range(1, T):
        means.append(A[t - 1] @ means[-1])
        margs.append(A[t - 1] @ margs[-1] @ A[t - 1].T + Q[t - 1])
    K = torch.zeros(T * D, T * D)
    for j in range(T):
        block = margs[j]
        for i in range(j, T):
            if i > j:
                block = A[i - 1] @ block
            K[i * D : (i + 1) * D, j * D : (j + 1) * D] = block
            K[j * D : (j + 1) * D, i * D : (i + 1) * D] = block.T
    return torch.cat(means), K


def _dense_frames(mean_z, K, C, d, R, mask):
    """Mean, covariance of the observed frames and their cross-covariance with the states."""
    T = mask.shape[0]
    big_C = torch.block_diag(*[C] * T)
    keep = mask.repeat_interleave(C.shape[0])
    mean = (big_C @ mean_z + d.repeat(T))[keep]
    cov = (big_C @ K @ big_C.T + torch.block_diag(*[R] * T))[keep][:, keep]
    cross = (K @ big_C.T)[:, keep]  # Cov(z, y_observed)
    return mean, cov, cross


def _time_varying_pair(exact: bool):
    """A user's pair with per-step transitions ``A_t = rot(0.3 t) * (0.95 - 0.05 t)`` and
    ``Q_t`` varying with t; the guide's potentials are the emission (exact) or shifted."""
    g = torch.Generator().manual_seed(3)
    angles = 0.3 * torch.arange(1, T)
    radii = 0.95 - 0.05 * torch.arange(1, T)
    cos, sin = angles.cos(), angles.sin()
    A = radii[:, None, None] * torch.stack(
        [torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2
    )
    Q = torch.diag_embed(
        torch.stack([0.1 + 0.05 * torch.arange(1, T), 0.3 - 0.04 * torch.arange(1, T)], -1)
    )
    m1, P1 = torch.tensor([0.5, -0.3]), torch.tensor([[1.2, 0.3], [0.3, 0.8]])
    C = torch.randn(M, D, generator=g)
    d = torch.randn(M, generator=g) * 0.3
    R = torch.diag(torch.tensor([0.4, 0.3, 0.5]))
    y = torch.randn(N, T, M, generator=g)
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 2] = mask[1, 4:] = False
    shift = 0.0 if exact else 0.4

    def prior():
        return StateSpacePrior(A, Q, m1, P1, num_steps=T)

    def model(y, mask):
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", prior())
            pyro.sample("y", LinearGaussianEmission(z, C, d, R, mask=mask, latent_site="z"), obs=y)

    def guide(y, mask):
        potentials = torch.where(mask[..., None], y - d + shift, torch.zeros_like(y))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("z", KalmanSmoothedPosterior(prior(), potentials, C, R * (1 + shift), mask))

    mean_z, K = _dense_state(A, Q, m1, P1, T)
    truth = 0.0
    for n in range(N):
        mean, cov, _ = _dense_frames(mean_z, K, C, d, R, mask[n])
        normal = torch.distributions.MultivariateNormal(mean, cov)
        truth += float(normal.log_prob(y[n][mask[n]].reshape(-1)))
    return model, guide, (y, mask), truth


# -- a particle loop on per-step transitions --------
def test_particle_loop_on_per_step_transitions_equals_the_dense_log_likelihood():
    """Exact guide, per-step A_t, Q_t: every engine, vectorised or looping over particles, gives
    the dense Gaussian log p(y) (float64, 1e-8)."""
    model, guide, args, truth = _time_varying_pair(exact=True)
    engines = {
        "kalman": KalmanELBO(),
        "kalman-loop": KalmanELBO(num_particles=3, vectorize_particles=False),
        "iwae-loop": IWAE(num_particles=3, vectorize_particles=False),
        "elbo-mc-kl-loop": ELBO(num_particles=3, analytic_kl=False, vectorize_particles=False),
    }
    for name, engine in engines.items():
        assert -engine.loss(model, guide, *args) == pytest.approx(truth, abs=1e-8), name


def test_kalman_elbo_particle_loop_averages_the_particles():
    """Inexact guide: KalmanELBO's value has no Monte-Carlo error with a linear-Gaussian
    emission, so the loop of 4 particles must give the one-particle value (a sum instead of a
    mean would give 4 times it); a strict bound below log p(y)."""
    model, guide, args, truth = _time_varying_pair(exact=False)
    one = -KalmanELBO().loss(model, guide, *args)
    loop = -KalmanELBO(num_particles=4, vectorize_particles=False).loss(model, guide, *args)
    assert loop == pytest.approx(one, abs=1e-9)
    assert one < truth - 0.1


# -- likelihood scales --------
def _structured_linear(**kw) -> StructuredVAE:
    model = StructuredVAE(
        x_dim=3, z_dim=2, likelihood="gaussian", net="linear", exact_potentials=True, **kw
    ).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.dynamics.generator_raw.copy_(torch.tensor([[-0.2, -0.6], [0.5, -0.3]]))
        model.decoder.weight.copy_(torch.randn(3, 2, generator=g))
        model.decoder.bias.copy_(torch.randn(3, generator=g))
    return model


def _structured_truth(model: StructuredVAE, y, mask, scale: float) -> float:
    """Dense log p(y_observed) of the linear-Gaussian StructuredVAE with ``R = scale^2 I``."""
    dyn = model.dynamics
    with torch.no_grad():
        A, Q = dyn.transition_matrix(), dyn.transition_cov()
        mean_z, K = _dense_state(
            A.expand(T - 1, D, D), Q.expand(T - 1, D, D), dyn.initial_loc, dyn.initial_cov(), T
        )
        R = torch.eye(3) * scale**2
        total = 0.0
        for n in range(y.shape[0]):
            mean, cov, _ = _dense_frames(
                mean_z, K, model.decoder.weight, model.decoder.bias, R, mask[n]
            )
            normal = torch.distributions.MultivariateNormal(mean, cov)
            total += float(normal.log_prob(y[n][mask[n]].reshape(-1)))
    return total


def _sequences(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(N, T, 3, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.3
    mask[:, 0] = True
    return y, mask


def test_log_likelihood_particle_loop_on_a_sequence_pair_is_exact():
    """``pvae.log_likelihood`` with one particle per run (``vectorize_particles=False``) on a
    StructuredVAE whose guide is the exact posterior: every importance weight is p(y_n), so the
    estimate is the dense log p(y_n) per sequence for any number of samples."""
    model = _structured_linear()
    with torch.no_grad():
        model.likelihood.log_scale.fill_(math.log(0.5))
    y, mask = _sequences(3)
    times = torch.arange(T, dtype=torch.float64).expand(N, T)
    got = pvae.log_likelihood(
        model.model, model.guide, (y, times, mask), num_samples=3, vectorize_particles=False
    )
    truth = [_structured_truth(model, y[n : n + 1], mask[n : n + 1], 0.5) for n in range(N)]
    torch.testing.assert_close(got, torch.tensor(truth), rtol=0, atol=1e-8)


@pytest.mark.parametrize("scale", [None, 0.35])
def test_structured_linear_gaussian_scale_learned_and_fixed(scale):
    """R = s^2 I with s fixed at 0.35 (``likelihood_kw``) or learned (set to 1.7): the exact
    bound equals the dense log p(y) computed with that s, and differs from the unit-scale one."""
    kw = {} if scale is None else {"likelihood_kw": {"scale": scale}}
    model = _structured_linear(**kw)
    if scale is None:
        with torch.no_grad():
            model.likelihood.log_scale.fill_(math.log(1.7))
    s = 1.7 if scale is None else scale
    y, mask = _sequences()
    truth = _structured_truth(model, y, mask, s)
    for engine in (KalmanELBO(), IWAE(num_particles=2)):
        assert -engine.loss(model.model, model.guide, y, None, mask) == pytest.approx(
            truth, abs=1e-8
        )
    # the reference takes s by hand (not from the model) and visibly depends on it
    assert abs(_structured_truth(model, y, mask, 1.0) - truth) > 0.1


def test_structured_neural_decoder_fixed_scale_is_scored_with_it():
    """MLP decoder, Gaussian likelihood with fixed scale 0.3: the model's frame site at a
    given trajectory is sum_t observed log N(y_t | decoder(z_t), 0.3^2 I), by hand."""
    model = StructuredVAE(
        x_dim=3, z_dim=2, hidden=(8,), likelihood="gaussian", likelihood_kw={"scale": 0.3}
    ).double()
    y, mask = _sequences(1)
    z = torch.randn(N, T, 2, generator=torch.Generator().manual_seed(2))
    trace = poutine.trace(poutine.condition(model.model, {"z": z})).get_trace(y, None, mask)
    site = trace.nodes["x"]
    got = site["fn"].log_prob(site["value"])  # (N,)
    with torch.no_grad():
        mean = model.decoder(z)
        hand = torch.distributions.Normal(mean, 0.3).log_prob(y).sum(-1)
    torch.testing.assert_close(got, (hand * mask).sum(-1))


# -- the decoder reads the GP values of a Markovian GP state --------
def test_markovian_gp_decoder_and_encode_read_the_gp_values():
    """nu = 3/2: the state is (f_1..f_L, f'_1..f'_L); the neural decoder must read z[..., :L].
    On a state whose derivatives differ from its values, the frame site's log density equals
    the hand computation from z[..., :L] and differs from the one from z[..., L:]; encode's
    means are the smoothed means of H z = z[..., :L]."""
    L = 2
    model = MarkovianGPVAE(
        x_dim=3, z_dim=L, nu=1.5, hidden=(8,), likelihood="gaussian", likelihood_kw={"scale": 0.5}
    ).double()
    g = torch.Generator().manual_seed(4)
    y = torch.randn(N, T, 3, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.3
    mask[:, 0] = True
    times = torch.arange(T, dtype=torch.float64).expand(N, T) * 0.7
    z = torch.randn(N, T, 2 * L, generator=g)
    trace = poutine.trace(poutine.condition(model.model, {"z": z})).get_trace(y, times, mask)
    site = trace.nodes["x"]
    got = site["fn"].log_prob(site["value"])
    with torch.no_grad():

        def hand(f):
            return (
                torch.distributions.Normal(model.decoder(f), 0.5).log_prob(y).sum(-1) * mask
            ).sum(-1)

        torch.testing.assert_close(got, hand(z[..., :L]))
        assert (got - hand(z[..., L:])).abs().min() > 1e-3  # the wrong slice is visible
        q = model.posterior(y, times, mask)
        H = model.gp.observation_matrix()
        mean, var = model.encode(y, times, mask)
    torch.testing.assert_close(mean, q.mean @ H.T)
    torch.testing.assert_close(var, (H @ q.smoother.smoothed_covs @ H.T).diagonal(dim1=-2, dim2=-1))
    assert (mean - q.mean[..., L:]).abs().max() > 1e-2


# -- horizons above one --------
@pytest.mark.parametrize("gap", [None, 0.5])
def test_structured_forecast_k_steps_is_the_exact_kalman_prediction(gap):
    """Forecast of 4 frames: ``C A^k E[z_T | y_observed] + d`` with ``A = expm(F gap)``, the
    conditional mean from the dense joint Gaussian of states and frames (float64, 1e-8)."""
    model = _structured_linear()
    with torch.no_grad():
        model.likelihood.log_scale.fill_(math.log(0.6))
    y, mask = _sequences(2)
    got = model.forecast(y, 4, mask, gap=gap)
    dyn = model.dynamics
    with torch.no_grad():
        A1, Q1 = dyn.transition_matrix(), dyn.transition_cov()
        mean_z, K = _dense_state(
            A1.expand(T - 1, D, D), Q1.expand(T - 1, D, D), dyn.initial_loc, dyn.initial_cov(), T
        )
        C, d = model.decoder.weight, model.decoder.bias
        R = torch.diag(model.likelihood.scale.expand(3).pow(2))
        A = torch.linalg.matrix_exp(dyn.generator() * (1.0 if gap is None else gap))
        for n in range(N):
            mean, cov, cross = _dense_frames(mean_z, K, C, d, R, mask[n])
            last = (mean_z + cross @ torch.linalg.solve(cov, y[n][mask[n]].reshape(-1) - mean))[-D:]
            for k in range(1, 5):
                expected = C @ torch.linalg.matrix_power(A, k) @ last + d
                torch.testing.assert_close(got[n, k - 1], expected, rtol=0, atol=1e-8)


def test_markovian_gp_imputes_a_trailing_gap_of_three_frames_exactly():
    """Linear-Gaussian decoder with exact potentials, nu = 3/2, the last 3 frames hidden (and
    NaN): impute fills them with ``C E[f_t | y_observed] + c``, the dense multi-output GP
    conditional (kernel from gpytorch's Matern; float64, 1e-8)."""

    L, X, steps = 2, 3, 8
    lengthscales, variances = (0.8, 2.0), (1.0, 1.5)
    model = MarkovianGPVAE(
        x_dim=X, z_dim=L, nu=1.5, likelihood="gaussian", net="linear", exact_potentials=True
    ).double()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        model.gp.lengthscale_raw.copy_((torch.tensor(lengthscales) - 1e-4).expm1().log())
        model.gp.variance_raw.copy_((torch.tensor(variances) - 1e-6).expm1().log())
        model.decoder.weight.copy_(torch.randn(X, L, generator=g))
        model.decoder.bias.copy_(torch.randn(X, generator=g))
        model.likelihood.log_scale.fill_(math.log(0.3))
    times = (torch.rand(1, steps, generator=g) + 0.2).cumsum(-1)
    values = torch.randn(1, steps, X, generator=g)
    mask = torch.ones(1, steps, dtype=torch.bool)
    mask[0, -3:] = False
    values[~mask] = float("nan")
    filled = model.impute(values, times, mask)
    K = torch.zeros(steps * L, steps * L)
    for c in range(L):
        K[c::L, c::L] = dense_kernel(1.5, times[0], lengthscales[c], variances[c])
    with torch.no_grad():
        C, bias = model.decoder.weight, model.decoder.bias
        R = torch.eye(X) * 0.3**2
        mean, cov, cross = _dense_frames(torch.zeros(steps * L), K, C, bias, R, mask[0])
        f = cross @ torch.linalg.solve(cov, values[0][mask[0]].reshape(-1) - mean)
        expected = f.reshape(steps, L) @ C.T + bias
    torch.testing.assert_close(filled[0, -3:], expected[-3:], rtol=0, atol=1e-8)
    torch.testing.assert_close(filled[mask], values[mask])


def test_koopman_predictive_loss_at_horizon_three_is_the_mean_of_the_h_step_errors():
    """Paths that do not follow A (a non-zero loss): horizon 3 is the mean over h = 1..3 of
    mean_{n,t} ||z_{t+h} - z_t A^h||^2, by hand with matrix powers."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 8, 3, generator=g)
    A = torch.randn(3, 3, generator=g) * 0.5
    hand = [
        (z[:, h:] - z[:, :-h] @ torch.linalg.matrix_power(A, h)).pow(2).sum(-1).mean()
        for h in (1, 2, 3)
    ]
    torch.testing.assert_close(predictive_loss(z, A, horizon=3), sum(hand) / 3)
    torch.testing.assert_close(predictive_loss(z, A, horizon=1), hand[0])
    # a horizon beyond the path is cut to T - 1
    steps = [
        (z[:, h:] - z[:, :-h] @ torch.linalg.matrix_power(A, h)).pow(2).sum(-1).mean()
        for h in range(1, 8)
    ]
    torch.testing.assert_close(predictive_loss(z, A, horizon=20), sum(steps) / 7)


# -- the multimodal GP's Markovian prior --------
def _ou_kernel(steps: int, dt: float, lengthscales: torch.Tensor) -> torch.Tensor:
    t = torch.arange(steps) * dt
    return torch.exp(-(t[:, None] - t).abs() / lengthscales[:, None, None])  # (C, T, T)


def test_markovian_prior_log_prob_posterior_and_kl_equal_the_dense_ou_gp():
    """Channels with lengthscales 2 and 5, dt 0.5: the state-space prior's log density is the
    dense OU GP's; the smoothed posterior given potentials N(loc_t | z_t, 1 / precision_t) has
    the dense conditional's mean and variances; KL(q || p) is the dense Gaussians' KL."""
    prior = MarkovianPrior(2, lengthscale=3.0).double()
    lengthscales = torch.tensor([2.0, 5.0])
    with torch.no_grad():
        prior.log_lengthscale.copy_(lengthscales.log())
    steps, dt, B = 9, 0.5, 2
    K = _ou_kernel(steps, dt, lengthscales)
    dense = torch.distributions.MultivariateNormal(torch.zeros(steps), K)  # batch (C,)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(B, steps, 2, generator=g)
    p = prior.prior(B, steps, dt)
    torch.testing.assert_close(p.log_prob(z), dense.log_prob(z.mT).sum(-1))

    loc = torch.randn(B, steps, 2, generator=g)
    precision = torch.rand(B, steps, 2, generator=g) + 0.3
    q = prior.posterior(loc, precision, dt)
    mean, variance = prior.path_moments(q, steps, dt)
    kl = torch.distributions.kl_divergence(q, p)
    for b in range(B):
        expected_kl = 0.0
        for c in range(2):
            noise = torch.diag(precision[b, :, c].reciprocal())
            gain = K[c] @ torch.linalg.inv(K[c] + noise)
            post_cov = K[c] - gain @ K[c]
            torch.testing.assert_close(mean[b, :, c], gain @ loc[b, :, c])
            torch.testing.assert_close(variance[b, :, c], post_cov.diagonal())
            post = torch.distributions.MultivariateNormal(gain @ loc[b, :, c], post_cov)
            prior_c = torch.distributions.MultivariateNormal(torch.zeros(steps), K[c])
            expected_kl += torch.distributions.kl_divergence(post, prior_c).item()
        assert float(kl[b].detach()) == pytest.approx(expected_kl, abs=1e-8)
