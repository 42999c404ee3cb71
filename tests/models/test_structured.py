"""StructuredVAE: the Kalman truth with a linear-Gaussian decoder and exact potentials, short
trainings on ``lds`` and ``pendulum`` with ELBO, IWAE and KalmanELBO, the conveniences, the
self-supervised masking and bad input."""

import math

import pyro
import pytest
import torch

from pvae import data
from pvae.inference import ELBO, IWAE, KalmanELBO
from pvae.models import StructuredVAE


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def _inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.expm1(value))


def _true_lds_model(ds) -> StructuredVAE:
    info = ds.info
    model = StructuredVAE(
        x_dim=4, z_dim=2, likelihood="gaussian", net="linear", exact_potentials=True
    ).double()
    with torch.no_grad():
        model.dynamics.set_transition(info["transition_matrix"], info["transition_cov"])
        model.dynamics.initial_raw.copy_(
            torch.diag(_inverse_softplus(info["initial_cov"].diagonal().sqrt() - 1e-4))
        )
        model.dynamics.initial_loc.copy_(info["initial_loc"])
        model.decoder.weight.copy_(info["observation_matrix"])
        model.decoder.bias.zero_()
        model.likelihood.log_scale.fill_(math.log(info["noise"]))
    return model


@pytest.mark.parametrize("missing", [0.0, 0.2])
def test_truth_linear_gaussian_bounds_equal_kalman_log_likelihood(missing):
    """With the true parameters, a linear-Gaussian decoder and the exact potentials, ELBO
    (Monte-Carlo KL: log w is constant), IWAE and KalmanELBO all equal log p(y), float64."""
    ds = data.load("lds", sizes=(2, 1, 6), num_steps=15, missing=missing)
    values, times, mask = ds.test
    model = _true_lds_model(ds)
    truth = float(data.lds_log_likelihood(ds, "test").sum())
    args = (values.double(), times.double(), mask)
    for engine in (KalmanELBO(), ELBO(analytic_kl=False), IWAE(num_particles=5)):
        assert -engine.loss(model.model, model.guide, *args) == pytest.approx(truth, abs=1e-6)
    # the analytic-KL ELBO is the same bound in expectation, one draw at a time
    assert -ELBO().loss(model.model, model.guide, *args) != pytest.approx(truth, abs=1e-3)


def _train(model, engine, split, steps, lr=0.02):
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": lr}), loss=engine)
    for _ in range(steps):
        svi.step(*split)


def _held_out_bound(model, split) -> float:
    model.eval()
    value = -KalmanELBO(num_particles=20).loss(model.model, model.guide, *split) / len(split[0])
    model.train()
    return value


ENGINES = {
    "elbo": lambda: ELBO(),
    "iwae": lambda: IWAE(num_particles=4),
    "kalman": lambda: KalmanELBO(),
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_trains_on_lds(engine):
    ds = data.load("lds", sizes=(32, 16, 1), num_steps=20)
    model = StructuredVAE(x_dim=4, z_dim=2, hidden=(32,), likelihood="gaussian", net="mlp")
    before = _held_out_bound(model, ds.valid)
    _train(model, ENGINES[engine](), ds.train, steps=60, lr=0.03)
    after = _held_out_bound(model, ds.valid)
    assert after > before + 5.0, (before, after)


@pytest.fixture(scope="module")
def pendulum():
    return data.load("pendulum", sizes=(32, 16, 1), num_steps=12, size=8, missing=0.25, seed=1)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_trains_on_pendulum(engine, pendulum):
    model = StructuredVAE(x_dim=pendulum.x_dim, z_dim=3, hidden=(64,))
    before = _held_out_bound(model, pendulum.valid)
    _train(model, ENGINES[engine](), pendulum.train, steps=40)
    after = _held_out_bound(model, pendulum.valid)
    assert after > before + 10.0, (before, after)


def test_impute_forecast_sample_shapes(pendulum):
    model = StructuredVAE(x_dim=pendulum.x_dim, z_dim=3, hidden=(16,))
    values, _, mask = pendulum.valid
    filled = model.impute(values, mask)
    assert filled.shape == values.shape
    assert torch.equal(filled[mask], values[mask])  # observed frames kept as given
    assert model.forecast(values, 4, mask).shape == (16, 4, 1, 8, 8)
    assert model.sample(7, num_samples=3).shape == (3, 7, 64)


@pytest.mark.slow
def test_imputation_beats_the_mean_frame_after_short_training():
    """150 KalmanELBO steps on 64 short pendulum videos (Gaussian likelihood, scale 0.1): the
    squared error on the hidden frames falls below half the mean observed frame's (measured:
    12% after 150 steps, 45% after 50; a decoder that ignores z stays at ~100%, as the
    continuous-Bernoulli likelihood does at this budget: it learns the background first)."""
    pyro.set_rng_seed(0)
    pendulum = data.load("pendulum", sizes=(64, 16, 1), num_steps=12, size=8, missing=0.25, seed=1)
    model = StructuredVAE(
        x_dim=pendulum.x_dim,
        z_dim=4,
        hidden=(64,),
        likelihood="gaussian",
        likelihood_kw={"scale": 0.1},
        drop_fraction=0.2,
        window=2,
    )
    _train(model, KalmanELBO(), pendulum.train, steps=150, lr=0.01)
    model.eval()
    values, _, mask = pendulum.valid
    filled = model.impute(values, mask)
    assert filled.shape == values.shape
    assert torch.equal(filled[mask], values[mask])  # observed frames kept as given
    clean = pendulum.truth["valid"]["frames"]
    mean_frame = values[mask].mean(0)
    error = (filled - clean).pow(2)[~mask].mean()
    baseline = (mean_frame - clean).pow(2)[~mask].mean()
    assert float(error) < 0.5 * float(baseline), (float(error), float(baseline))


def test_self_supervised_masking_hides_frames_from_the_encoder_only():
    model = StructuredVAE(
        x_dim=4, z_dim=2, hidden=(8,), likelihood="gaussian", drop_fraction=0.4, window=3
    )
    mask = torch.ones(50, 20, dtype=torch.bool)
    dropped = model._drop_windows(mask)
    hidden = (~dropped).sum(1)
    assert hidden.min() >= 3 and hidden.max() <= 9  # ceil(0.4 * 20 / 3) = 3 windows of 3
    values = torch.randn(5, 20, 4)
    trace = pyro.poutine.trace(model.guide).get_trace(values, None, mask[:5])
    assert not trace.nodes["z"]["fn"].observation_mask.all()
    model.eval()
    trace = pyro.poutine.trace(model.guide).get_trace(values, None, mask[:5])
    assert trace.nodes["z"]["fn"].observation_mask.all()


def test_conv_nets_and_parallel_smoother(pendulum):
    model = StructuredVAE(
        x_dim=pendulum.x_dim,
        z_dim=2,
        hidden=(16,),
        net="conv",
        image_shape=(1, 8, 8),
        method="parallel",
    )
    record = KalmanELBO().train_step(model.model, model.guide, *pendulum.valid)
    assert math.isfinite(record.bound)


def test_bad_input_raises():
    model = StructuredVAE(x_dim=4, z_dim=2, hidden=(8,), likelihood="gaussian")
    values = torch.randn(3, 5, 4)
    with pytest.raises(TypeError, match="mask"):
        model.model(values, None, torch.ones(3, 5))
    with pytest.raises(ValueError, match="mask"):
        model.guide(values, None, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="values"):
        model.model(torch.randn(3, 5, 6), None, None)
    with pytest.raises(ValueError, match="linear"):
        StructuredVAE(x_dim=4, net="linear", likelihood="bernoulli")
    with pytest.raises(ValueError, match="exact_potentials"):
        StructuredVAE(x_dim=4, exact_potentials=True)
    with pytest.raises(ValueError, match="steps"):
        model.forecast(values, 0)


@pytest.mark.parametrize("gap", [None, 2.0])
def test_forecast_is_the_exact_predictive_mean_of_the_linear_gaussian_model(gap):
    """With the true linear-Gaussian parameters and exact potentials, ``forecast`` is
    ``E[y_{T+k} | observed y_1..y_T]`` (k = 1..3 steps of ``gap``): checked against the dense
    Gaussian conditional of the stacked states, built from (A, Q, m_1, P_1, C, R) without the
    Kalman code; the last given frame is hidden, so the forecast must start from the filtered
    state at T, not from the last observed frame's."""
    ds = data.load("lds", sizes=(2, 1, 3), num_steps=8, missing=0.25, seed=1)
    values, _, mask = ds.test
    mask = mask.clone()
    mask[:, -1] = False  # the last given frame is hidden
    model = _true_lds_model(ds)
    steps, T = 3, values.shape[1]
    got = model.forecast(values.double(), steps, mask, gap=gap)
    d = model.dynamics
    A1, Q1 = d.transition_matrix().detach(), d.transition_cov().detach()
    Ag, Qg = d.transition_matrix(gap).detach(), d.transition_cov(gap).detach()
    C, R = model.decoder.weight.detach(), torch.diag(model.likelihood.scale.detach().pow(2))
    D, N = 2, T + steps
    # z_1..z_N: z_{t+1} = A_t z_t + q_t with (A1, Q1) inside the sequence, (Ag, Qg) after it
    trans = [A1] * (T - 1) + [Ag] * steps
    noise = [Q1] * (T - 1) + [Qg] * steps
    mean = [d.initial_loc.detach()]
    blocks = torch.zeros(N, D, N * D, dtype=torch.float64)  # z_t = sum_s M[t, s] e_s
    blocks[0, :, :D] = torch.linalg.cholesky(d.initial_cov().detach())
    for t in range(1, N):
        mean.append(trans[t - 1] @ mean[-1])
        blocks[t] = trans[t - 1] @ blocks[t - 1]
        blocks[t, :, t * D : (t + 1) * D] += torch.linalg.cholesky(noise[t - 1])
    cov = blocks.reshape(N * D, N * D) @ blocks.reshape(N * D, N * D).mT
    mu = torch.cat(mean)
    for n in range(values.shape[0]):
        seen = torch.nonzero(mask[n]).flatten()
        H = torch.zeros(len(seen) * 4, N * D, dtype=torch.float64)
        for i, t in enumerate(seen.tolist()):
            H[i * 4 : (i + 1) * 4, t * D : (t + 1) * D] = C
        y = values[n, seen].double().reshape(-1)
        S = H @ cov @ H.mT + torch.block_diag(*[R] * len(seen))
        posterior_mean = mu + cov @ H.mT @ torch.linalg.solve(S, y - H @ mu)
        future = posterior_mean.reshape(N, D)[T:]
        torch.testing.assert_close(got[n], future @ C.mT, rtol=1e-8, atol=1e-10)
