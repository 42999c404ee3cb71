"""Pairs written like Pyro's own examples (tests/clients/pyro_examples.py) train with pvae.fit
under every engine and estimator and are evaluated by pvae.log_likelihood, unmodified (the
DMM, whose plate is named "z_minibatch", with ``data_plate="z_minibatch"``).

"Trains" means the held-out log-likelihood (importance-sampled, the same draws before and
after) improves. The CVAE and SS-VAE pairs index with boolean masks or concatenate
particle-dependent with per-datapoint tensors, so they run with ``vectorize_particles=False``
(engines and log_likelihood alike); the VAE pair vectorises.
"""

import math

import pyro
import pytest
import torch
from pyro_examples import CVAE, DMM, SSVAE, VAE, digits, quadrants, sequences, train_baseline

import pvae
from pvae.inference import CIWAE, ELBO, IWAE, MIWAE, PIWAE

pytestmark = pytest.mark.filterwarnings("ignore:.*estimator='stl' and K > 1")

# Every engine with every estimator it takes (small K: the unvectorisable pairs loop).
ENGINES = {
    "ELBO-reparam": lambda v: ELBO(estimator="reparam", vectorize_particles=v),
    "ELBO-stl": lambda v: ELBO(estimator="stl", vectorize_particles=v),
    **{
        f"{name}-{estimator}": (lambda v, make=make, estimator=estimator: make(estimator, v))
        for name, make in {
            "IWAE": lambda e, v: IWAE(3, estimator=e, vectorize_particles=v),
            "MIWAE": lambda e, v: MIWAE(2, 2, estimator=e, vectorize_particles=v),
            "CIWAE": lambda e, v: CIWAE(3, beta=0.5, estimator=e, vectorize_particles=v),
            "PIWAE": lambda e, v: PIWAE(2, 2, estimator=e, vectorize_particles=v),
        }.items()
        for estimator in ("reparam", "stl", "dreg")
    },
}


def vae_case():
    train, valid, _, _ = digits()
    torch.manual_seed(0)
    pair = VAE()
    return pair, train, valid, True


def cvae_case():
    train, valid, _, _ = digits()
    (xs, ys), valid_xy = quadrants(train), quadrants(valid)
    pair = CVAE(pre_trained_baseline_net=train_baseline(xs, ys))
    return pair, (xs, ys), valid_xy, False


def ssvae_case():
    train, valid, train_labels, valid_labels = digits()
    onehot = torch.nn.functional.one_hot
    torch.manual_seed(0)
    pair = SSVAE()
    train_xy = (train, onehot(train_labels, 10).to(train.dtype))
    valid_xy = (valid, onehot(valid_labels, 10).to(valid.dtype))
    return pair, train_xy, valid_xy, False


CASES = {"vae": vae_case, "cvae": cvae_case, "ssvae": ssvae_case}


def held_out(pair, valid, vectorize):
    """Mean importance-sampled log p over the held-out set, 8 samples, fixed draws."""
    pyro.set_rng_seed(123)
    ll = pvae.log_likelihood(
        pair.model, pair.guide, valid, num_samples=8, vectorize_particles=vectorize
    )
    assert ll.shape == (100,) and torch.isfinite(ll).all()
    return ll.mean().item()


@pytest.mark.parametrize("engine_name", list(ENGINES))
@pytest.mark.parametrize("case", list(CASES))
def test_pyro_example_trains_and_evaluates(case, engine_name):
    pair, train, valid, vectorize = CASES[case]()
    before = held_out(pair, valid, vectorize)
    engine = ENGINES[engine_name](vectorize)
    run = pvae.fit(
        pair.model, pair.guide, train, engine, epochs=2, batch_size=50, lr=1e-2, progress=False
    )
    after = held_out(pair, valid, vectorize)
    assert all(math.isfinite(s["bound"]) for s in run.steps)
    # The bound is per datapoint in nats, so it is of the order of the 48-64 scored pixels'
    # log-probabilities, not of N times that (an unsized plate scaled by -N gave +1e19).
    assert all(-100 < b < 0 for b in run.train_bound), run.train_bound
    # Measured: 12 steps raise the held-out log-likelihood by 11 to 18 nats, from about -45
    # (VAE), -49 (SS-VAE) and -33 (CVAE); 5 nats is far above the noise of 8 fixed draws.
    assert after > before + 5, (before, after)


@pytest.mark.parametrize("case", ["cvae", "ssvae"])
def test_unvectorisable_examples_name_the_option(case):
    pair, _, valid, _ = CASES[case]()
    with pytest.raises(pvae.VectorizationError, match="vectorize_particles=False"):
        pvae.log_likelihood(pair.model, pair.guide, valid, num_samples=4)
    with pytest.raises(pvae.VectorizationError, match="vectorize_particles=False"):
        IWAE(3).loss(pair.model, pair.guide, *valid)


def test_cvae_encoder_registered_in_the_model_is_the_guides():
    """Pyro's CVAE registers every network in the model: ownership by use gives the
    recognition network to the guide, the prior and generation networks to the model."""
    pair, train, _, _ = cvae_case()
    model_params, guide_params = pvae.protocol.param_split(pair.model, pair.guide, train)
    assert guide_params and all("recognition_net" in name for name in guide_params)
    assert not any("recognition_net" in name for name in model_params)
    assert any("prior_net" in name for name in model_params)
    assert any("generation_net.fc1" in name for name in model_params)


def test_pyro_dmm_trains_with_its_own_plate_name():
    """Pyro's deep Markov model, whose plate is named "z_minibatch", trains as written with
    ``data_plate="z_minibatch"``; its bound and log-likelihood are evaluated on held-out
    sequences."""
    torch.manual_seed(0)
    pair = DMM()
    train, valid = sequences(96, seed=0), sequences(32, seed=1)

    def held_out_dmm():
        pyro.set_rng_seed(123)
        ll = pvae.log_likelihood(
            pair.model, pair.guide, valid, num_samples=8, data_plate="z_minibatch"
        )
        assert ll.shape == (32,) and torch.isfinite(ll).all()
        return ll.mean().item()

    before = held_out_dmm()
    run = pvae.fit(
        pair.model, pair.guide, train, ELBO(), epochs=4, batch_size=16, lr=1e-2,
        progress=False, data_plate="z_minibatch",
    )  # fmt: skip
    after = held_out_dmm()
    bound = pvae.evaluate_bound(
        pair.model, pair.guide, valid, IWAE(4), batch_size=16, data_plate="z_minibatch"
    )
    assert all(math.isfinite(s["bound"]) for s in run.steps)
    # At most 6 steps of 8 notes are scored: a per-sequence bound of the order of 8 * 6 bits.
    assert all(-60 < b < 0 for b in run.train_bound), run.train_bound
    assert -60 < bound < 0
    # Measured: 24 steps raise the held-out log-likelihood from about -27 to -23 nats;
    # 2 nats is well above the noise of 8 fixed draws on 32 sequences.
    assert after > before + 2, (before, after)
    with pytest.raises(ValueError, match=r"plate 'z_minibatch' over the batch"):
        pvae.log_likelihood(pair.model, pair.guide, valid, num_samples=2)
