"""Hostile inputs to the sequence APIs (issue 19): unsorted or repeated time stamps refused by
every sequence model, NaN at hidden frames ignored by ``impute`` (and by the gradients), the
Kalman smoother's covariances, data and dtypes checked before any work, GP hyper-parameters
checked up front."""

import math

import pyro
import pytest
import torch

from pvae import gp, ssm, validation
from pvae.inference import KalmanELBO
from pvae.models import GPVAE, KoopmanVAE, MarkovianGPVAE, MultimodalGPVAE, StructuredVAE

B, T = 2, 6


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


# -- time stamps --------------------------------------------------------------------------------
def _bad_times(kind: str) -> torch.Tensor:
    times = torch.arange(T, dtype=torch.float32).expand(B, T).clone()
    if kind == "duplicate":
        times[1, 3] = times[1, 2]
    else:
        times[1, 3], times[1, 2] = times[1, 2].item(), times[1, 3].item()
    return times


def _sequence_calls():
    """(name, call(times)) for every sequence model's model, guide and impute."""
    values = torch.rand(B, T, 4)
    mask = torch.ones(B, T, dtype=torch.bool)
    svae = StructuredVAE(x_dim=4, z_dim=2, hidden=(8,), name="rel_svae")
    mgp = MarkovianGPVAE(x_dim=4, z_dim=2, hidden=(8,), name="rel_mgp")
    gpvae = GPVAE(x_dim=4, z_dim=2, hidden=(8,), name="rel_gpvae")
    kvae = KoopmanVAE(x_dim=4, z_dim=2, hidden=8, name="rel_kvae")
    mm = MultimodalGPVAE(3, hidden=(8,), name="rel_mm")
    counts = torch.poisson(torch.ones(B, T, 3))
    frames = torch.rand(B, T, 1, 8, 8)
    return [
        ("svae.model", lambda t: svae.model(values, t, mask)),
        ("svae.guide", lambda t: svae.guide(values, t, mask)),
        ("svae.impute", lambda t: svae.impute(values, mask, t)),
        ("mgpvae.model", lambda t: mgp.model(values, t, mask)),
        ("mgpvae.impute", lambda t: mgp.impute(values, t, mask)),
        ("gpvae.model", lambda t: gpvae.model(values, t, mask)),
        ("gpvae.guide", lambda t: gpvae.guide(values, t, mask)),
        ("kvae.model", lambda t: kvae.model(values, t, mask)),
        ("kvae.impute", lambda t: kvae.impute(values, mask, t)),
        ("mmgpvae.model", lambda t: mm.model(counts, frames, t)),
    ]


@pytest.mark.parametrize("kind", ["duplicate", "unsorted"])
def test_every_sequence_model_refuses_bad_time_stamps(kind):
    """A repeated stamp once gave GPVAE a bound of -22126.7 (vs -1172.0) and KoopmanVAE's
    spline 5.2e10 at a hidden row; now each names times and the first offending stamp."""
    times = _bad_times(kind)
    for name, call in _sequence_calls():
        with pytest.raises(ValueError, match=r"times\[1, 3\] = \d+ <= times\[1, 2\]") as info:
            call(times)
        assert ("repeated" if kind == "duplicate" else "out of order") in str(info.value), name


def test_time_stamp_helper_messages():
    with pytest.raises(TypeError, match="times must be a floating-point tensor"):
        validation.check_times(torch.arange(4))
    with pytest.raises(ValueError, match=r"times must be finite; times\[2\] = nan"):
        validation.check_times(torch.tensor([0.0, 1.0, math.nan]))
    with pytest.raises(ValueError, match=r"stamps\[1\] = 0 <= stamps\[0\] = 1"):
        validation.check_times(torch.tensor([1.0, 0.0, 2.0]), "stamps")
    gaps = validation.check_times(torch.tensor([[0.0, 0.5, 2.0]]))
    torch.testing.assert_close(gaps, torch.tensor([[0.5, 1.5]]))


# -- impute with NaN at hidden frames -------------------------------------------------------------
def _with_nan_at_hidden_frames():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(3, 8, 5, generator=g)
    mask = torch.rand(3, 8, generator=g) > 0.3
    mask[:, 0] = True
    poisoned = values.clone()
    poisoned[~mask] = math.nan
    times = torch.cumsum(torch.rand(3, 8, generator=g) + 0.2, 1)
    return values, poisoned, times, mask


@pytest.mark.parametrize("which", ["svae", "mgpvae"])
def test_impute_and_gradients_ignore_nan_at_hidden_frames(which):
    values, poisoned, times, mask = _with_nan_at_hidden_frames()
    if which == "svae":
        model = StructuredVAE(x_dim=5, z_dim=2, hidden=(8,), likelihood="gaussian")
        clean = model.impute(values, mask, times)
        filled = model.impute(poisoned, mask, times)
    else:
        model = MarkovianGPVAE(x_dim=5, z_dim=2, hidden=(8,), likelihood="gaussian")
        clean = model.impute(values, times, mask)
        filled = model.impute(poisoned, times, mask)
    assert torch.isfinite(filled).all()
    torch.testing.assert_close(filled[~mask], clean[~mask])  # hidden frames never read
    assert torch.equal(filled[mask], values[mask])
    # a training step on the same batch: finite loss and finite gradients
    model.train()
    loss = KalmanELBO().differentiable_loss(model.model, model.guide, poisoned, times, mask)
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# -- the Kalman smoother -----------------------------------------------------------------------
def _lgssm(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(2, dtype=dtype)
    return {
        "y": torch.randn(7, 2, generator=g, dtype=dtype),
        "transition_matrix": torch.tensor([[0.9, 0.2], [-0.1, 0.8]], dtype=dtype),
        "transition_cov": 0.2 * eye,
        "observation_matrix": torch.tensor([[1.0, 0.0], [0.5, 1.0]], dtype=dtype),
        "observation_cov": 0.3 * eye,
        "initial_loc": torch.zeros(2, dtype=dtype),
        "initial_cov": eye.clone(),
    }


@pytest.mark.parametrize("name", ["transition_cov", "observation_cov", "initial_cov"])
@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_smoother_refuses_non_symmetric_and_non_psd_covariances(name, method):
    """A non-symmetric Q once gave -20.028 sequential vs -20.391 parallel; R's upper triangle
    was ignored. Both, and indefinite matrices, are refused naming the argument."""
    args = _lgssm()
    skewed = args[name].clone()
    skewed[0, 1] += 0.1
    with pytest.raises(ValueError, match=f"{name} must be a symmetric covariance matrix"):
        ssm.kalman_smoother(**{**args, name: skewed}, method=method)
    indefinite = torch.tensor([[0.3, 0.6], [0.6, 0.3]], dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{name} must be a positive semi-definite"):
        ssm.kalman_smoother(**{**args, name: indefinite}, method=method)
    # a per-step stack names the first offending step
    if name != "initial_cov":
        steps = 6 if name == "transition_cov" else 7
        stack = args[name].expand(steps, 2, 2).clone()
        stack[4] = indefinite
        with pytest.raises(ValueError, match=rf"{name}\[4\] is not"):
            ssm.kalman_smoother(**{**args, name: stack}, method=method)


def test_smoother_accepts_singular_covariances_and_names_zero_ones_when_they_collide():
    args = _lgssm()
    zero = torch.zeros(2, 2, dtype=torch.float64)
    reference = ssm.kalman_smoother(**args).log_normalizer
    for name in ("transition_cov", "observation_cov", "initial_cov"):  # each alone is a model
        value = ssm.kalman_smoother(**{**args, name: zero}).log_normalizer
        assert torch.isfinite(value) and value != reference
    for method in ("sequential", "parallel"):
        with pytest.raises(ValueError, match="observation_cov and initial_cov all zero"):
            ssm.kalman_smoother(
                **{**args, "observation_cov": zero, "initial_cov": zero}, method=method
            )


def test_smoother_refuses_non_finite_observed_data_but_not_hidden_nan():
    args = _lgssm()
    for bad in (math.nan, math.inf):
        y = args["y"].clone()
        y[3, 1] = bad
        with pytest.raises(ValueError, match=r"y must be finite at observed steps; y\[3, 1\]"):
            ssm.kalman_smoother(**{**args, "y": y})
        mask = torch.ones(7, dtype=torch.bool)
        mask[3] = False
        hidden = ssm.kalman_smoother(**{**args, "y": y}, mask=mask)
        zeroed = ssm.kalman_smoother(**{**args, "y": torch.where(mask[:, None], y, 0.0)}, mask=mask)
        torch.testing.assert_close(hidden.log_normalizer, zeroed.log_normalizer)
        torch.testing.assert_close(hidden.smoothed_means, zeroed.smoothed_means)
    broken = _lgssm()["transition_matrix"].clone()
    broken[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"transition_matrix must be finite"):
        ssm.kalman_smoother(**{**args, "transition_matrix": broken})


def test_smoother_refuses_half_precision_and_bad_sample_counts():
    half = {k: v.half() for k, v in _lgssm().items()}
    with pytest.raises(TypeError, match="float32 or float64.*float16"):
        ssm.kalman_smoother(**half)
    result = ssm.kalman_smoother(**_lgssm())
    with pytest.raises(ValueError, match="num_samples"):
        result.sample(2.5)
    with pytest.raises(TypeError, match="num_samples"):
        result.sample("3")
    assert result.sample(3).shape == (3, 7, 2)


# -- GP hyper-parameters -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_gp_refuses_bad_hyperparameters_up_front(bad):
    times = torch.linspace(0, 5, 10, dtype=torch.float64)
    y = torch.sin(times)
    one = torch.tensor(1.0, dtype=torch.float64)
    value = torch.tensor(bad, dtype=torch.float64)
    with pytest.raises(ValueError, match="lengthscale must be finite and positive"):
        gp.matern_log_marginal(1.5, y, times, value, one, 0.1)
    with pytest.raises(ValueError, match="variance must be finite and positive"):
        gp.matern_regression(2.5, y, times, one, value, 0.1)
    if bad != 0.0:  # noise 0 is the GP's own density
        with pytest.raises(ValueError, match="noise must be finite and >= 0"):
            gp.matern_log_marginal(0.5, y, times, one, one, bad)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lengthscale": math.nan}, "lengthscale"),
        ({"lengthscale": 1e-5}, "lengthscale"),
        ({"lengthscale": 0.0}, "lengthscale"),
        ({"variance": math.inf}, "variance"),
        ({"variance": -1.0}, "variance"),
    ],
)
def test_markovian_gpvae_refuses_bad_hyperparameters_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MarkovianGPVAE(x_dim=4, z_dim=2, hidden=(8,), **kwargs)


@pytest.mark.slow  # ~7 s: the CLI loads the dataset before building the model
def test_cli_refuses_a_lengthscale_below_the_floor_before_writing(tmp_path, capsys):
    from pvae.app import cli

    run_dir = tmp_path / "run"
    argv = ["train", "--model", "mgpvae", "--dataset", "rotating-digits", "--epochs", "1"]
    argv += ["--mgpvae-lengthscale", "1e-5", "--run-dir", str(run_dir), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pvae: error: ") and "lengthscale must be finite and greater" in err
    assert not run_dir.exists()
