"""Posterior collapse of the linear CVAE: Dang et al.'s closed forms (PAPERS.md) against the
worked example and against a linear CVAE written as a Pyro pair and fitted with pvae.fit."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae
from pvae.diagnostics import collapse_report, kl_per_dim
from pvae.diagnostics.theory import linear_cvae_collapse, residual_eigenvalues
from pvae.inference import ELBO


def test_worked_example_of_papers_md():
    result = linear_cvae_collapse(theta=torch.tensor([3.0, 1.52, 0.60, 0.20]), z_dim=4)
    torch.testing.assert_close(
        result.singular_values, torch.tensor([1.414, 0.721, 0.0, 0.0]).double(), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        result.encoder_std, torch.tensor([0.577, 0.811, 1.0, 1.0]).double(), atol=1e-3, rtol=0
    )
    assert result.collapsed.tolist() == [False, False, True, True]
    assert result.num_collapsed == 2 and result.threshold == 1.0


def test_residual_covariance_from_moments_and_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g, dtype=torch.float64)
    A = torch.randn(3, 2, generator=g, dtype=torch.float64)
    y = x @ A + 0.5 * torch.randn(500, 2, generator=g, dtype=torch.float64)
    n = x.shape[0]
    theta = residual_eigenvalues(x.T @ x / n, x.T @ y / n, y.T @ y / n)
    # the same as the eigenvalues of the least-squares residuals' second moment
    coef = torch.linalg.lstsq(x, y).solution
    r = y - x @ coef
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(r.T @ r / n).flip(0))
    from_data = linear_cvae_collapse(x=x, y=y, z_dim=3, beta=0.1)
    torch.testing.assert_close(from_data.theta, theta)
    assert from_data.collapsed.tolist() == [False, False, True]  # d_z > d_y: extra mode is off


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="give Sxx"):
        linear_cvae_collapse(z_dim=2)
    with pytest.raises(ValueError, match="beta"):
        linear_cvae_collapse(theta=torch.ones(2), z_dim=2, beta=0.0)


# --------------------------------------------------------------------------------------------
# Fitting the linear CVAE as a Pyro pair.

X_DIM, Y_DIM, Z_DIM, N = 2, 4, 4, 2000
THETA = torch.tensor([3.0, 1.5, 0.6, 0.2], dtype=torch.float64)


def synthetic(seed=0):
    """x ~ N(0, I), y = A x + R eps with R R^T = Q diag(THETA) Q^T (random rotation Q); the
    empirical residual covariance is then close to, not equal to, diag(THETA) rotated."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(Y_DIM, Y_DIM, generator=g, dtype=torch.float64))
    A = torch.randn(X_DIM, Y_DIM, generator=g, dtype=torch.float64)
    x = torch.randn(N, X_DIM, generator=g, dtype=torch.float64)
    eps = torch.randn(N, Y_DIM, generator=g, dtype=torch.float64)
    y = x @ A + (eps * THETA.sqrt()) @ Q.T
    return x.float(), y.float()


def linear_cvae(eta_enc, eta_dec, seed=0):
    """The linear CVAE of PAPERS.md as a plain Pyro pair (pyro.param, no pvae class)."""
    g = torch.Generator().manual_seed(seed)

    def init(*shape):
        return 0.1 * torch.randn(*shape, generator=g)

    W1, W2, U1, U2 = init(Z_DIM, X_DIM), init(Z_DIM, Y_DIM), init(Y_DIM, Z_DIM), init(Y_DIM, X_DIM)

    def model(x, y):
        u1 = pyro.param("U1", U1)
        u2 = pyro.param("U2", U2)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z_DIM), eta_enc).to_event(1))
            pyro.sample("y", dist.Normal(z @ u1.T + x @ u2.T, eta_dec).to_event(1), obs=y)

    def guide(x, y):
        w1 = pyro.param("W1", W1)
        w2 = pyro.param("W2", W2)
        log_sigma = pyro.param("log_sigma", torch.zeros(Z_DIM))
        with pyro.plate("data", x.shape[0]):
            loc = x @ w1.T + y @ w2.T
            pyro.sample("z", dist.Normal(loc, log_sigma.exp().expand_as(loc)).to_event(1))

    return model, guide


CONFIGS = [  # (beta, eta_enc, eta_dec): thresholds beta * eta_dec^2 of 1, 0.32 and 2
    (1.0, 1.0, 1.0),
    (0.5, 1.5, 0.8),
    (2.0, 0.5, 1.0),
]


@pytest.mark.slow
@pytest.mark.parametrize("beta, eta_enc, eta_dec", CONFIGS)
def test_fitted_linear_cvae_matches_theory(beta, eta_enc, eta_dec):
    """Full-batch Adam on the beta-ELBO (pvae.fit + pvae.inference.ELBO), 3000 steps.

    The prediction uses the sample's own moments, so it has no sampling error; what is left is
    the optimiser's: single-sample ELBO gradients make Adam (lr 0.02) jitter by ~0.01, and a
    collapsing mode whose theta is close to the threshold decays slowly (its singular value
    shrinks geometrically at a rate ~ threshold - theta). Measured errors: active singular
    values and encoder stds within 0.018, KLs within 0.02, collapsed singular values <= 0.07.
    Tolerances: 0.05 for active values and KLs, 0.1 for collapsed singular values. Writing the
    threshold as 2 beta eta_dec^2 or beta eta_dec^2 / 2 (the wrong factor-1/2 convention) moves
    the first singular value by > 0.15 and fails.
    """
    x, y = synthetic()
    predicted = linear_cvae_collapse(
        x=x, y=y, z_dim=Z_DIM, beta=beta, eta_enc=eta_enc, eta_dec=eta_dec
    )
    model, guide = linear_cvae(eta_enc, eta_dec)
    pvae.fit(
        model,
        guide,
        (x, y),
        engine=ELBO(beta=beta),
        epochs=3000,
        batch_size=N,
        lr=0.02,
        progress=False,
    )
    store = pyro.get_param_store()
    U1 = store["U1"].detach().double()
    singular = torch.linalg.svdvals(U1)  # descending, as predicted
    sigma = store["log_sigma"].detach().double().exp()
    active = ~predicted.collapsed
    torch.testing.assert_close(
        singular[active], predicted.singular_values[active], atol=0.05, rtol=0
    )
    assert singular[~active].max() < 0.1
    # encoder stds: compare sorted (the latent axes are the modes up to a permutation)
    torch.testing.assert_close(
        sigma.sort().values, predicted.encoder_std.sort().values, atol=0.05, rtol=0
    )
    # collapse_report flags exactly the predicted number of modes, and exactly the latent
    # dimensions whose decoder column vanished
    report = collapse_report(model, guide, (x, y), num_particles=1)
    layer = report.layers["z"]
    assert int(layer.collapsed.sum()) == predicted.num_collapsed
    assert layer.collapsed.tolist() == (U1.norm(dim=0) < 0.1).tolist()
    kl = kl_per_dim(model, guide, (x, y)).kl
    torch.testing.assert_close(kl.sort(descending=True).values, predicted.kl, atol=0.05, rtol=0)
    assert math.isclose(predicted.threshold, beta * eta_dec**2)
