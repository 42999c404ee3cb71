"""Bad arguments to fit, log_likelihood and the engines are refused at once, naming the
argument (issue 10)."""

import pytest
import torch

import pvae
from pvae.inference import CIWAE, ELBO, IWAE, MIWAE, CyclicalAnnealing, LinearAnnealing


@pytest.mark.parametrize(
    "kwargs, kind, name",
    [
        ({"chunk_size": -5}, ValueError, "chunk_size"),
        ({"num_samples": 2.5}, ValueError, "num_samples"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, ValueError, "batch_size"),
    ],
)
def test_log_likelihood_arguments(kwargs, kind, name, x, make_pair):
    pair = make_pair()
    with pytest.raises(kind, match=name):
        pvae.log_likelihood(pair.model, pair.guide, x[:4], **{"num_samples": 4, **kwargs})


def test_log_likelihood_refuses_empty_data(x, make_pair):
    pair = make_pair()
    with pytest.raises(ValueError, match="data is empty"):
        pvae.log_likelihood(pair.model, pair.guide, x[:0], num_samples=4)


@pytest.mark.parametrize(
    "kwargs, kind, name",
    [
        ({"batch_size": 2.5}, ValueError, "batch_size"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"epochs": -1}, ValueError, "epochs"),
        ({"engine": "iwae"}, TypeError, "engine"),
        ({"seed": 99999999999}, ValueError, "seed"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"optimizer": "adamax9"}, ValueError, "optimizer"),
        ({"aggressive_encoder": 0}, ValueError, "aggressive_encoder"),
    ],
)
def test_fit_arguments(kwargs, kind, name, x, make_pair, tmp_path):
    pair = make_pair()
    run_dir = tmp_path / "run"
    with pytest.raises(kind, match=name):
        pvae.fit(pair.model, pair.guide, x, progress=False, run_dir=run_dir, **kwargs)
    assert not run_dir.exists()  # nothing on disk changes


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: ELBO(beta=float("nan")), "beta"),
        (lambda: ELBO(beta=-1.0), "beta"),
        (lambda: ELBO(free_bits=float("nan")), "free_bits"),
        (lambda: ELBO(num_particles=float("nan")), "num_particles"),
        (lambda: IWAE(num_particles=float("nan")), "num_particles"),
        (lambda: MIWAE(2.5, 2), "num_outer"),
        (lambda: CIWAE(4, beta=float("nan")), "beta"),
        (lambda: CyclicalAnnealing(period=0), "period"),
        (lambda: CyclicalAnnealing(period=10, ratio=2.0), "ratio"),
        (lambda: LinearAnnealing(num_steps=-1), "num_steps"),
    ],
)
def test_engine_arguments_are_validated_at_construction(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_a_schedule_that_yields_a_negative_beta_is_refused(x, make_pair):
    pair = make_pair()
    engine = ELBO(beta=lambda step: -0.5)
    with pytest.raises(ValueError, match="beta = -0.5"):
        engine.loss_and_grads(pair.model, pair.guide, x[:8])


def test_a_good_call_still_returns_finite_values(x, make_pair):
    pair = make_pair()
    ll = pvae.log_likelihood(pair.model, pair.guide, x[:4], num_samples=4.0, batch_size=2)
    assert ll.shape == (4,) and torch.isfinite(ll).all()
