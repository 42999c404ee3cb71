"""StateSpacePrior and KalmanSmoothedPosterior against dense Gaussians, and inside Pyro pairs."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pvae.distributions import KalmanSmoothedPosterior, StateSpacePrior
from pvae.inference import ELBO, IWAE
from tests.core.test_ssm import dense_condition, dense_prior, make_problem
from tests.mc_bands import assert_gaussian_moments

F64 = torch.float64


def prior_and_potentials(seed=0, T=5, method="sequential"):
    p = make_problem(T=T, D=2, M=2, batch=(3,), seed=seed)
    prior = StateSpacePrior(
        p["transition_matrix"],
        p["transition_cov"],
        p["initial_loc"],
        p["initial_cov"],
        num_steps=T,
        method=method,
    )
    return p, prior


def dense_posterior(p, b):
    T, D = p["y"].shape[-2], p["initial_loc"].shape[-1]
    mu, Sigma = dense_prior(
        p["transition_matrix"], p["transition_cov"], p["initial_loc"][b], p["initial_cov"], T
    )
    _, m, S = dense_condition(
        mu,
        Sigma,
        p["observation_matrix"][b],
        p["observation_cov"][b],
        p["y"][b],
        p["mask"][b],
        T,
        D,
    )
    return MultivariateNormal(mu, Sigma), MultivariateNormal(m, S)


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_prior_log_prob_and_posterior_log_prob_against_dense(method):
    p, prior = prior_and_potentials(method=method)
    q = KalmanSmoothedPosterior(
        prior, p["y"], p["observation_matrix"], p["observation_cov"], mask=p["mask"]
    )
    assert prior.batch_shape == q.batch_shape == (3,)
    assert prior.event_shape == q.event_shape == (5, 2)
    x = torch.randn(4, 3, 5, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    lp_prior, lp_q = prior.log_prob(x), q.log_prob(x)
    assert lp_q.shape == (4, 3)
    for b in range(3):
        dense_p, dense_q = dense_posterior(p, b)
        flat = x[:, b].reshape(4, -1)
        torch.testing.assert_close(lp_prior[:, b], dense_p.log_prob(flat), atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(lp_q[:, b], dense_q.log_prob(flat), atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(q.mean[b].reshape(-1), dense_q.mean, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(
            q.variance[b].reshape(-1), dense_q.variance, atol=1e-8, rtol=1e-8
        )
        torch.testing.assert_close(prior.mean[b].reshape(-1), dense_p.mean)
        torch.testing.assert_close(q.entropy()[b], dense_q.entropy(), atol=1e-8, rtol=1e-8)


def test_kl_against_dense_kl_own_prior_and_another_prior():
    p, prior = prior_and_potentials(seed=2)
    q = KalmanSmoothedPosterior(
        prior, p["y"], p["observation_matrix"], p["observation_cov"], mask=p["mask"]
    )
    other = make_problem(T=5, D=2, M=2, batch=(3,), seed=9)
    prior2 = StateSpacePrior(
        other["transition_matrix"],
        other["transition_cov"],
        other["initial_loc"],
        other["initial_cov"],
        num_steps=5,
    )
    kl_own, kl_other = kl_divergence(q, prior), kl_divergence(q, prior2)
    # the general formula, used for other priors, agrees with the potentials formula
    torch.testing.assert_close(-q.entropy() - q.expected_log_prior(prior), kl_own)
    for b in range(3):
        dense_p, dense_q = dense_posterior(p, b)
        mu2, Sigma2 = dense_prior(
            other["transition_matrix"],
            other["transition_cov"],
            other["initial_loc"][b],
            other["initial_cov"],
            5,
        )
        torch.testing.assert_close(kl_own[b], kl_divergence(dense_q, dense_p), atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(
            kl_other[b],
            kl_divergence(dense_q, MultivariateNormal(mu2, Sigma2)),
            atol=1e-8,
            rtol=1e-8,
        )


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_prior_rsample_moments(method):
    """40k draws: every entry of the mean and covariance within 5 standard errors (from the
    dense prior); a 20% error in any variance lies at least 4 bands (28 SE) away."""
    p, prior = prior_and_potentials(seed=4, T=4, method=method)
    torch.manual_seed(0)
    x = prior.rsample((40000,))
    assert x.shape == (40000, 3, 4, 2)
    dense_p, _ = dense_posterior(p, 2)
    flat = x[:, 2].reshape(40000, -1)
    assert_gaussian_moments(flat, dense_p.mean, dense_p.covariance_matrix)  # 5 SE


def test_rsample_gradients_flow_to_encoder_outputs_and_expand():
    _, prior = prior_and_potentials()
    loc = torch.randn(3, 5, 2, dtype=F64, requires_grad=True)
    scale = (torch.rand(3, 5, 2, dtype=F64) + 0.5).requires_grad_(True)
    q = KalmanSmoothedPosterior.from_diagonal_potentials(prior, loc, scale)
    z = q.rsample((2,))
    assert z.shape == (2, 3, 5, 2)
    (z.sum() + kl_divergence(q, prior).sum()).backward()
    assert loc.grad.abs().sum() > 0 and scale.grad.abs().sum() > 0
    big = q.expand((4, 3))
    assert big.batch_shape == (4, 3) and big.rsample().shape == (4, 3, 5, 2)
    torch.testing.assert_close(big.log_prob(z[0]), q.log_prob(z[0]).expand(4, 3))
    torch.testing.assert_close(kl_divergence(big, prior.expand((4, 3)))[1], kl_divergence(q, prior))


def linear_gaussian_pair(T=6, D=2, noise=0.5):
    """x_t = z_t + N(0, noise^2 I) under a state-space prior, with the exact posterior as guide.

    The guide's potentials are the data themselves, so q equals the true posterior: every
    bound equals log p(x) = the Kalman log normaliser, with zero variance.
    """
    A = torch.tensor([[0.9, 0.2], [-0.1, 0.8]], dtype=F64)
    Q = 0.3 * torch.eye(D, dtype=F64)

    def make_prior(n):
        return StateSpacePrior(
            A, Q, torch.zeros(n, D, dtype=F64), torch.eye(D, dtype=F64), num_steps=T
        )

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", make_prior(x.shape[0]))
            pyro.sample("x", dist.Normal(z, noise).to_event(2), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            scale = torch.full_like(x, noise)
            pyro.sample(
                "z",
                KalmanSmoothedPosterior.from_diagonal_potentials(make_prior(x.shape[0]), x, scale),
            )

    x = torch.randn(4, T, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(D, dtype=F64)
    log_px = make_prior(4)
    truth = KalmanSmoothedPosterior(log_px, x, eye, noise**2 * eye).smoother.log_normalizer
    return model, guide, x, truth


@pytest.mark.parametrize(
    "engine", [ELBO(analytic_kl=False), IWAE(num_particles=3), pyro.infer.Trace_ELBO()]
)
def test_bounds_equal_log_likelihood_with_the_exact_posterior(engine):
    pyro.clear_param_store()
    model, guide, x, truth = linear_gaussian_pair()
    loss = engine.loss(model, guide, x)
    assert abs(loss + truth.sum().item()) < 1e-8 * abs(loss)


def test_analytic_kl_elbo_is_unbiased():
    """With the analytic KL only the reconstruction term is random: over 4000 particles its
    standard error is about 0.05 nats here; the tolerance is 0.3."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, x, truth = linear_gaussian_pair()
    loss = ELBO(num_particles=4000).loss(model, guide, x)
    assert abs(loss + truth.sum().item()) < 0.3


def test_bad_arguments():
    p, prior = prior_and_potentials()
    with pytest.raises(ValueError, match="num_steps"):
        StateSpacePrior(
            p["transition_matrix"],
            p["transition_cov"],
            p["initial_loc"],
            p["initial_cov"],
            num_steps=0,
        )
    with pytest.raises(ValueError, match="transition_matrix"):
        StateSpacePrior(
            torch.eye(3, dtype=F64),
            p["transition_cov"],
            p["initial_loc"],
            p["initial_cov"],
            num_steps=5,
        )
    with pytest.raises(TypeError, match="prior"):
        KalmanSmoothedPosterior("prior", p["y"], p["observation_matrix"], p["observation_cov"])
    with pytest.raises(ValueError, match="observations"):
        KalmanSmoothedPosterior(
            prior, p["y"][..., :3, :], p["observation_matrix"], p["observation_cov"]
        )


def test_log_likelihood_estimator_with_the_exact_posterior():
    import pvae

    model, guide, x, truth = linear_gaussian_pair()
    ll = pvae.log_likelihood(model, guide, x, num_samples=8, batch_size=4)
    torch.testing.assert_close(ll.to(truth.dtype), truth, atol=1e-6, rtol=1e-6)


def test_every_former_import_path_names_the_package_s_object():
    """The distributions moved out of the model files into ``pvae.distributions``; the model
    modules re-export them, so code importing them from there gets the same objects."""
    import pvae.distributions as package
    from pvae import gp
    from pvae.models import gp_vae, koopman, multimodal, multimodal_gp, sgpbae

    assert gp_vae.BandedGaussian is package.BandedGaussian
    assert gp_vae.bidiagonal_solve is package.bidiagonal_solve
    assert multimodal.StratifiedMixture is package.StratifiedMixture
    assert koopman.SequentialPrior is package.SequentialPrior
    for name in ("FourierRBFPrior", "MarkovianPrior", "TemporalPrior", "fourier_basis"):
        assert getattr(multimodal_gp, name) is getattr(package, name)
    assert gp_vae.gp_kernel is gp.gp_kernel and sgpbae.gp_kernel is gp.gp_kernel
    assert gp_vae.exact_gp_settings is gp.exact_gp_settings and gp_vae.KERNELS is gp.KERNELS
    assert koopman.natural_cubic_spline is gp.natural_cubic_spline
