"""SGPBAE: the sparse GP prior against dense computations, sampling with SGHMC, latent recovery
and imputation on rotating digits, and bad input."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import pvae
from pvae.inference import SGHMC
from pvae.models import SGPBAE
from pvae.models.sgpbae import fitc_conditional, frames_and_inputs, latent_r2


def _rbf(a: torch.Tensor, b: torch.Tensor, ell: float, s2: float) -> torch.Tensor:
    """s2 exp(-(a - b)^2 / (2 ell^2)), written out (the dense reference)."""
    return s2 * torch.exp(-0.5 * (a[:, None] - b[None, :]).square() / ell**2)


def _model(z_u: torch.Tensor, **kw) -> SGPBAE:
    pyro.clear_param_store()
    return SGPBAE(x_dim=4, z_dim=2, inducing_inputs=z_u, hidden=(5,), **kw).double()


def test_sparse_prior_log_density_equals_dense_joint() -> None:
    """log p(u) + sum_n log p(z_n | u) equals the dense Gaussian over (u_l, z_{:,l}) with
    covariance [[K_uu, K_un], [K_nu, Q_nn + diag(K_nn - Q_nn) + jitter]], per channel."""
    torch.manual_seed(0)
    jitter, ell, s2 = 1e-3, 0.7, 1.3
    z_u = torch.linspace(0, 3, 5, dtype=torch.float64)
    t = torch.rand(7, dtype=torch.float64) * 3
    model = _model(z_u, jitter=jitter)
    fixed = {
        "lengthscale": torch.tensor([ell], dtype=torch.float64),
        "variance": torch.tensor(s2, dtype=torch.float64),
    }
    trace = pyro.poutine.trace(pyro.poutine.condition(model.model, data=fixed)).get_trace(None, t)
    u, z = trace.nodes["u"]["value"], trace.nodes["z"]["value"]  # (L, M), (N, L)
    sparse = sum(
        trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"]).sum() for name in ("u", "z")
    )
    k_uu = _rbf(z_u, z_u, ell, s2) + jitter * torch.eye(5, dtype=torch.float64)
    k_nu = _rbf(t, z_u, ell, s2)
    q_nn = k_nu @ torch.linalg.solve(k_uu, k_nu.T)
    residual = torch.diag(s2 - torch.diagonal(q_nn) + jitter)
    joint = torch.cat([torch.cat([k_uu, k_nu.T], 1), torch.cat([k_nu, q_nn + residual], 1)], 0)
    dense = torch.distributions.MultivariateNormal(torch.zeros(12).double(), joint)
    expected = sum(dense.log_prob(torch.cat([u[l], z[:, l]])) for l in range(2))
    assert abs(float(sparse - expected)) < 1e-8 * max(1.0, abs(float(expected)))


def test_fitc_with_inducing_points_at_the_data_is_the_exact_gp() -> None:
    """M = N inducing inputs at the data inputs: the conditional mean interpolates u, the
    residual vanishes, and the marginal covariance of the codes is the exact K_nn + jitter."""
    jitter, ell, s2 = 1e-10, 1.0, 0.8
    t = torch.linspace(0, 4, 9, dtype=torch.float64)
    k = _rbf(t, t, ell, s2)
    eye = torch.eye(9, dtype=torch.float64)
    projection, variance = fitc_conditional(k + jitter * eye, k, torch.diagonal(k), jitter)
    assert torch.allclose(projection, eye, atol=1e-5)
    assert float(variance.max()) < 1e-8
    marginal = projection @ (k + jitter * eye) @ projection.T + torch.diag(variance)
    assert torch.allclose(marginal, k + jitter * eye, atol=1e-8)
    # and through the model: the codes' conditional given u equals u at the data inputs
    model = _model(t, jitter=jitter)
    _, projection_model, _ = model._conditional(
        t[:, None], torch.tensor([ell], dtype=torch.float64), torch.tensor(s2, dtype=torch.float64)
    )
    assert torch.allclose(projection_model, eye, atol=1e-5)


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 2, 8, dtype=torch.float64)
    x = torch.rand(8, 4, generator=generator, dtype=torch.float64)
    return x, t


def test_sampling_returns_every_site_with_its_shape() -> None:
    x, t = _tiny()
    model = _model(torch.linspace(0, 2, 3, dtype=torch.float64))
    posterior = pvae.sample(
        model.model, (x, t), sampler=SGHMC(), num_samples=4, warmup=6, num_chains=2,
        batch_size=8, seed=0, progress=False,
    )  # fmt: skip
    shapes = {name: tuple(value.shape) for name, value in posterior.samples.items()}
    assert shapes == {
        "lengthscale": (2, 4, 1),
        "variance": (2, 4),
        "u": (2, 4, 2, 3),
        "z": (2, 4, 8, 2),
        "decoder.0.weight": (2, 4, 5, 2),
        "decoder.0.bias": (2, 4, 5),
        "decoder.1.weight": (2, 4, 4, 5),
        "decoder.1.bias": (2, 4, 4),
    }
    assert bool((posterior.samples["lengthscale"] > 0).all())
    assert bool(torch.isfinite(posterior.log_joint).all())
    assert model.predict_codes(posterior, t[:3]).shape == (8, 3, 2)
    assert model.impute(posterior, t[:3], num_draws=5).shape == (3, 4)
    codes = posterior.mean()["z"]
    assert model.fit_encoder(x, codes, steps=300) < 1e-2  # 8 points: the MLP fits them
    assert torch.allclose(model.encode(x), codes, atol=0.3)


def test_minibatched_codes_are_refused() -> None:
    x, t = _tiny()
    model = _model(torch.linspace(0, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="'z'.*plate"):
        pvae.sample(model.model, (x, t), num_samples=2, warmup=0, batch_size=4, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"z_dim": 0}, ValueError, "z_dim"),
        ({"inducing_inputs": [0.0, 1.0]}, TypeError, "inducing_inputs"),
        ({"inducing_inputs": torch.zeros(2, 1, 1)}, ValueError, "inducing_inputs"),
        ({"inducing_inputs": torch.tensor([0.0, math.nan])}, ValueError, "finite"),
        ({"kernel": "periodic"}, ValueError, "kernel"),
        ({"likelihood": "gaussian"}, ValueError, "parameters"),
        ({"jitter": -1.0}, ValueError, "jitter"),
        ({"length_scale": "1"}, TypeError, "length_scale"),
    ],
)
def test_bad_construction(kwargs: dict, error: type, match: str) -> None:
    arguments = {"x_dim": 4, "z_dim": 2, "inducing_inputs": torch.linspace(0, 1, 3)}
    with pytest.raises(error, match=match):
        SGPBAE(**{**arguments, **kwargs})


def test_bad_calls() -> None:
    x, t = _tiny()
    model = _model(torch.linspace(0, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"t must be \(B, 1\)"):
        model.model(x, torch.zeros(8, 2).double())
    with pytest.raises(TypeError, match="t must be a floating tensor"):
        model.model(x, torch.arange(8))
    with pytest.raises(ValueError, match="x must be"):
        model.model(x[:, :3], t)
    with pytest.raises(ValueError, match="codes must be"):
        model.fit_encoder(x, torch.zeros(8, 3).double())
    with pytest.raises(ValueError, match="lacks the sites"):
        model.impute({"u": torch.zeros(1, 2, 3)}, t)
    with pytest.raises(TypeError, match="posterior"):
        model.impute([1, 2], t)


def test_latent_r2_is_one_for_an_affine_map_and_zero_for_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(200, generator=generator)
    codes = torch.stack([2 * target + 1, torch.randn(200, generator=generator)], 1)
    assert latent_r2(codes, target) == pytest.approx(1.0, abs=1e-10)
    assert latent_r2(torch.randn(200, 2, generator=generator), target) < 0.05


# ---------------------------------------------------------------------------------------------
# Rotating digits: one digit turning, 100 frames of which 60 observed; the angle is the input
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotating() -> dict:
    ds = pvae.data.load("rotating-digits", sizes=(1, 1, 1), num_steps=100, seed=0)
    angles, frames = ds.truth["train"]["angles"], ds.truth["train"]["frames"]
    x, t = frames_and_inputs(ds.train, angles)
    _, t_missing = frames_and_inputs(ds.train, angles, observed=False)
    x, t, t_missing = x.double(), t.double(), t_missing.double()
    inducing = torch.linspace(float(t.min()), float(t.max()), 20, dtype=torch.float64)
    pyro.clear_param_store()
    model = SGPBAE(64, 2, inducing, hidden=(32,), length_scale=0.5).double()
    posterior = pvae.sample(
        model.model, (x, t), sampler=SGHMC(init_radius=0.1), num_samples=200,
        warmup=1000, thin=2, batch_size=1000, seed=0, progress=False,
    )  # fmt: skip
    clean_missing = frames[~ds.train.mask].reshape(len(t_missing), -1).double()
    return {
        "model": model,
        "posterior": posterior,
        "x": x,
        "angles": angles[ds.train.mask],
        "t_missing": t_missing,
        "clean_missing": clean_missing,
    }


@pytest.mark.slow
def test_latent_recovery_on_rotating_digits(rotating: dict) -> None:
    """The posterior-mean codes explain the angle path affinely (R^2 above 0.4; codes with
    no relation to the angle give about 0.03 on 60 frames and 2 channels)."""
    codes = rotating["posterior"].mean()["z"]
    r2 = latent_r2(codes, rotating["angles"])
    assert r2 > 0.4, r2
    model = rotating["model"]
    model.fit_encoder(rotating["x"], codes, steps=300)
    assert latent_r2(model.encode(rotating["x"]), rotating["angles"]) > 0.35


@pytest.mark.slow
def test_imputation_of_missing_frames_beats_the_mean_frame(rotating: dict) -> None:
    """The 40 missing frames, decoded from their GP codes at their known angles: mean squared
    error against the clean frames at most half that of the mean observed frame."""
    model, posterior = rotating["model"], rotating["posterior"]
    imputed = model.impute(posterior, rotating["t_missing"], num_draws=50)
    mse = float((imputed - rotating["clean_missing"]).square().mean())
    baseline = float((rotating["x"].mean(0) - rotating["clean_missing"]).square().mean())
    assert mse < 0.5 * baseline, (mse, baseline)
