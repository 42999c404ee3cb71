"""GPVAE (dense GP prior over time, banded guide): the prior against gpytorch's MVN, the
banded Gaussian against dense computations, exact solves above 800 points, short trainings
on ``hmnist-like`` with ELBO and IWAE, imputation against the mean-pixel baseline, bad input."""

import math

import gpytorch
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

import pvae
from pvae import data
from pvae.data.gp_sets import imputation_mse, mean_pixel_baseline, with_entry_mask
from pvae.inference import ELBO, IWAE
from pvae.models import GPVAE
from pvae.models.gp_vae import (
    KERNELS,
    BandedGaussian,
    bidiagonal_solve,
    exact_gp_settings,
    gp_kernel,
    imputation_metrics,
)
from tests.mc_bands import assert_gaussian_moments


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def _banded(batch=(3,), T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(*batch, T, generator=g, dtype=torch.float64)
    diagonal = 0.5 + torch.rand(*batch, T, generator=g, dtype=torch.float64)
    superdiagonal = torch.randn(*batch, T - 1, generator=g, dtype=torch.float64)
    return BandedGaussian(loc, diagonal, superdiagonal)


def _dense(q: BandedGaussian) -> MultivariateNormal:
    B = torch.diag_embed(q.diagonal) + torch.diag_embed(q.superdiagonal, 1)
    return MultivariateNormal(q.loc, precision_matrix=B @ B.mT)


# -- the banded guide ---------------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("T", [1, 2, 5, 16, 33])
def test_bidiagonal_solve_matches_dense(T, transpose):
    q = _banded((2,), T)
    rhs = torch.randn(4, 2, T, dtype=torch.float64)
    B = q.bidiagonal
    matrix = B.mT if transpose else B
    expected = torch.linalg.solve(matrix, rhs[..., None]).squeeze(-1)
    got = bidiagonal_solve(q.diagonal, q.superdiagonal, rhs, transpose=transpose)
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-10)


def test_banded_log_prob_entropy_covariance_equal_dense():
    q = _banded((2, 3), 9)
    reference = _dense(q)
    z = torch.randn(5, 2, 3, 9, dtype=torch.float64)
    assert torch.allclose(q.log_prob(z), reference.log_prob(z), atol=1e-8, rtol=0)
    assert torch.allclose(q.entropy(), reference.entropy(), atol=1e-8, rtol=0)
    assert torch.allclose(q.covariance_matrix, reference.covariance_matrix, atol=1e-8, rtol=0)
    assert torch.allclose(q.variance, reference.variance, atol=1e-8, rtol=0)
    assert q.batch_shape == (2, 3) and q.event_shape == (9,)


@pytest.mark.parametrize("shared_prior", [True, False])
def test_banded_kl_to_gp_prior_equals_dense(shared_prior):
    T = 12
    q = _banded((4, 3), T)
    times = torch.linspace(0, 5, T, dtype=torch.float64)
    K = gp_kernel("cauchy", 1.5, 1.2).double()(times[:, None]).to_dense() + 1e-6 * torch.eye(
        T, dtype=torch.float64
    )
    if shared_prior:  # one (T, T) covariance broadcast over the batch, as the model builds it
        p = dist.MultivariateNormal(
            torch.zeros(4, 3, T, dtype=torch.float64), scale_tril=torch.linalg.cholesky(K)
        )
    else:
        loc = torch.randn(4, 3, T, dtype=torch.float64)
        p = dist.MultivariateNormal(loc, covariance_matrix=K.expand(4, 3, T, T))
    expected = kl_divergence(_dense(q), MultivariateNormal(p.loc, covariance_matrix=K))
    got = kl_divergence(q, p)
    assert got.shape == (4, 3)
    assert torch.allclose(got, expected, atol=1e-8, rtol=0)
    # and through the Independent wrappers the model and guide use
    wrapped = kl_divergence(q.to_event(1), p.to_event(1))
    assert torch.allclose(wrapped, expected.sum(-1), atol=1e-8, rtol=0)


def test_banded_rsample_moments_match():
    """Mean and covariance of 40,000 draws, every entry within 5 standard errors of its
    estimator (from q's covariance); a 20% error in any variance lies 4 bands (28 SE) away."""
    q = _banded((), 6)
    z = q.rsample(torch.Size([40_000]))
    assert_gaussian_moments(z.detach(), q.loc.detach(), q.covariance_matrix.detach())  # 5 SE
    assert z.requires_grad is False
    loc = q.loc.clone().requires_grad_()
    BandedGaussian(loc, q.diagonal, q.superdiagonal).rsample().sum().backward()
    assert loc.grad is not None


# -- the prior -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_prior_equals_gpytorch_mvn(kernel):
    model = GPVAE(x_dim=4, z_dim=3, kernel=kernel, length_scale=1.7, scale=0.8).double()
    times = torch.sort(torch.rand(2, 11, dtype=torch.float64) * 10, -1).values
    prior = model.prior(times)
    assert prior.batch_shape == (2,) and prior.event_shape == (3, 11)
    z = prior.sample()
    jitter = model.jitter * torch.eye(11, dtype=torch.float64)
    with exact_gp_settings():
        covariance = model.kernel(times[..., None]).to_dense() + jitter
        reference = gpytorch.distributions.MultivariateNormal(
            torch.zeros(2, 11, dtype=torch.float64), covariance
        )
        expected = sum(reference.log_prob(z[:, channel]) for channel in range(3))
    assert torch.allclose(prior.log_prob(z), expected, atol=1e-8, rtol=0)


def test_cauchy_kernel_is_the_papers_formula():
    t = torch.linspace(0, 6, 7, dtype=torch.float64)
    K = gp_kernel("cauchy", 2.0, 1.5).double()(t[:, None]).to_dense()
    d = t[:, None] - t[None, :]
    assert torch.allclose(K, 1.5**2 / (1 + d**2 / 2.0**2), atol=1e-12)


def test_exact_solves_above_800_points():
    """T = 900, one channel: the prior's log-density equals the Cholesky-based one, and
    gpytorch's own MVN gives the same value under exact_gp_settings (no conjugate gradients:
    gpytorch's default limit of 800 points is lifted)."""
    T = 900
    model = GPVAE(x_dim=2, z_dim=1, kernel="matern32", length_scale=20.0).double()
    times = torch.arange(T, dtype=torch.float64)[None]
    z = model.prior(times).sample()
    K = model.kernel(times[0, :, None]).to_dense() + model.jitter * torch.eye(
        T, dtype=torch.float64
    )
    L = torch.linalg.cholesky(K)
    white = torch.linalg.solve_triangular(L, z[0, 0, :, None], upper=False)
    expected = (
        -0.5 * white.pow(2).sum() - L.diagonal().log().sum() - 0.5 * T * math.log(2 * math.pi)
    )
    assert torch.allclose(model.prior(times).log_prob(z), expected, atol=1e-8, rtol=0)
    with exact_gp_settings():
        assert gpytorch.settings.max_cholesky_size.value() >= T
        assert not gpytorch.settings.fast_computations.log_prob.on()
        gp = gpytorch.distributions.MultivariateNormal(torch.zeros(T, dtype=torch.float64), K)
        assert torch.allclose(gp.log_prob(z[0, 0]), expected, atol=1e-8, rtol=0)


def test_learned_kernel_gets_gradients_and_fixed_kernel_does_not():
    x = torch.rand(2, 6, 4)
    learned = GPVAE(x_dim=4, z_dim=2, learn_kernel=True)
    ELBO().loss_and_grads(learned.model, learned.guide, x)
    assert learned.kernel.base_kernel.raw_lengthscale.grad is not None
    names = set(pyro.get_param_store().keys())
    assert any("kernel" in name for name in names)
    pyro.clear_param_store()
    fixed = GPVAE(x_dim=4, z_dim=2)
    ELBO().loss_and_grads(fixed.model, fixed.guide, x)
    assert not any("kernel" in name for name in pyro.get_param_store().keys())
    assert fixed.length_scale.item() == pytest.approx(2.0)


# -- training on hmnist-like ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hmnist():
    return data.load("hmnist-like", sizes=(128, 1, 32), missing=0.1, seed=0)


def _held_out_bound(model, split) -> float:
    return -IWAE(num_particles=8).loss(model.model, model.guide, *split) / len(split[0])


@pytest.mark.parametrize("engine", [ELBO(), IWAE(num_particles=4)], ids=["elbo", "iwae"])
def test_trains_on_hmnist_like(hmnist, engine):
    train = tuple(tensor[:64] for tensor in with_entry_mask(hmnist, "train"))
    test = with_entry_mask(hmnist, "test")
    model = GPVAE(x_dim=hmnist.x_dim, z_dim=4, hidden=(64,))
    before = _held_out_bound(model, test)
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.01}), loss=engine)
    for _ in range(60):
        svi.step(*train)
    after = _held_out_bound(model, test)
    # per sequence, 64 pixels x 10 frames x 40% observed: an untrained decoder loses ~100 nats
    assert after > before + 30


def test_imputation_beats_mean_pixel_baseline(hmnist):
    pyro.set_rng_seed(1)
    train, test = with_entry_mask(hmnist, "train"), with_entry_mask(hmnist, "test")
    # a Gaussian likelihood of fixed scale: its decoded mean is the conditional mean of a pixel
    model = GPVAE(
        x_dim=hmnist.x_dim,
        z_dim=4,
        hidden=(64,),
        likelihood="gaussian",
        likelihood_kw={"scale": 0.2},
    )
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.01}), loss=ELBO())
    for _ in range(120):
        svi.step(*train)
    imputed = model.impute(*test)
    baseline = imputation_mse(mean_pixel_baseline(hmnist, "test"), hmnist, "test")
    ours = imputation_mse(imputed, hmnist, "test")
    assert ours < 0.9 * baseline
    metrics = imputation_metrics(model, *test, hmnist.truth["test"]["frames"], num_samples=4)
    assert metrics["mse"] == pytest.approx(ours, rel=1e-5)
    assert math.isfinite(metrics["nll"])


def test_fit_and_log_likelihood_take_the_entry_mask(hmnist):
    model = GPVAE(x_dim=hmnist.x_dim, z_dim=2, hidden=(32,))
    train, test = with_entry_mask(hmnist, "train"), with_entry_mask(hmnist, "test")
    run = pvae.fit(model.model, model.guide, train, epochs=1, batch_size=32, progress=False)
    assert math.isfinite(run.train_bound[-1])
    ll = pvae.log_likelihood(model.model, model.guide, test, num_samples=4)
    assert ll.shape == (32,) and torch.isfinite(ll).all()


def test_entries_outside_the_mask_are_not_scored():
    """Changing the values at unobserved entries changes neither the model's log-density
    (likelihood on observed entries only) nor the guide (the encoder sees zeros there)."""
    x = torch.rand(2, 5, 6)
    mask = torch.tensor([[True, True, False, True, True]] * 2)
    observed = torch.rand(2, 5, 6) > 0.5
    model = GPVAE(x_dim=6, z_dim=2)
    other = torch.where(observed & mask[..., None], x, torch.rand(2, 5, 6))
    traces = []
    for values in (x, other):
        guide = pyro.poutine.trace(pyro.poutine.seed(model.guide, rng_seed=3)).get_trace(
            values, None, mask, observed
        )
        run = pyro.poutine.trace(pyro.poutine.replay(model.model, trace=guide)).get_trace(
            values, None, mask, observed
        )
        traces.append((guide.log_prob_sum(), run.log_prob_sum()))
    assert torch.allclose(traces[0][0], traces[1][0])
    assert torch.allclose(traces[0][1], traces[1][1])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="kernel"):
        GPVAE(x_dim=4, kernel="periodic")
    with pytest.raises(ValueError, match="length_scale"):
        GPVAE(x_dim=4, length_scale=0.0)
    model = GPVAE(x_dim=4, z_dim=2)
    x = torch.rand(2, 5, 4)
    with pytest.raises(ValueError, match="values"):
        model.model(torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match="times"):
        model.model(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        model.model(x, None, torch.ones(2, 5))
    with pytest.raises(ValueError, match="observed"):
        model.model(x, None, None, torch.ones(2, 5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="superdiagonal"):
        BandedGaussian(torch.zeros(4), torch.ones(4), torch.zeros(4))
