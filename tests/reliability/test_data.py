"""Bad data is refused before any work, naming the argument, the row and the column; a data
plate of another name, or none, is refused by fit and by every engine (issue 10)."""

import numpy as np
import pyro
import pytest
import torch
from engine_cases import ENGINES

import pvae
from pvae.inference import IWAE


def fit(pair, data, **kwargs):
    kwargs = {"epochs": 1, "batch_size": 16, "progress": False, **kwargs}
    return pvae.fit(pair.model, pair.guide, data, **kwargs)


@pytest.mark.parametrize("plate", ["batch", None])
@pytest.mark.parametrize("make", list(ENGINES.values()), ids=list(ENGINES))
def test_fit_refuses_a_pair_without_a_data_plate(plate, make, x, make_pair):
    with pytest.raises(ValueError, match=r"pyro.plate\('data'") as error:
        fit(make_pair(plate=plate), x, engine=make())
    if plate:
        assert "'batch'" in str(error.value)


@pytest.mark.parametrize("plate", ["batch", None])
@pytest.mark.parametrize("make", list(ENGINES.values()), ids=list(ENGINES))
def test_engines_refuse_a_pair_without_a_data_plate(plate, make, x, make_pair):
    pair = make_pair(plate=plate)
    with pytest.raises(ValueError, match=r"pyro.plate\('data'"):
        make().loss_and_grads(pair.model, pair.guide, x[:8])


def test_an_unsized_data_plate_still_trains(x, make_pair):
    pair = make_pair()

    def model(x):
        pyro.module("decoder", pair.decoder)
        with pyro.plate("data"):
            z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", pyro.distributions.Normal(pair.decoder(z), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", pair.encoder)
        with pyro.plate("data"):
            loc, raw = pair.encoder(x).chunk(2, -1)
            scale = torch.nn.functional.softplus(raw) + 1e-3
            pyro.sample("z", pyro.distributions.Normal(loc, scale).to_event(1))

    run = pvae.fit(model, guide, x, epochs=1, batch_size=16, progress=False)
    assert np.isfinite(run.train_bound[-1])


def test_data_outside_the_support_in_a_later_batch_is_refused(binary, make_pair):
    data = binary.clone()
    data[50, 3] = 0.5  # one grey pixel in the fourth batch
    with pytest.raises(ValueError, match=r"train holds 0.5 at row 50, column 3.*support"):
        fit(make_pair(likelihood="bernoulli"), data)


@pytest.mark.parametrize(
    "value, likelihood", [(float("nan"), "normal"), (float("inf"), "normal"), (0.5, "bernoulli")]
)
def test_a_data_problem_in_the_first_batch_is_a_data_error(value, likelihood, x, binary, make_pair):
    data = (binary if likelihood == "bernoulli" else x).clone()
    data[3, 2] = value
    with pytest.raises(ValueError, match="row 3, column 2") as error:
        fit(make_pair(likelihood=likelihood), data)
    assert not isinstance(error.value, pvae.TrainingDiverged)
    assert "checkpoint" not in str(error.value)


def test_negative_counts_are_refused_for_a_poisson_likelihood():
    counts = torch.poisson(torch.full((32, 4), 3.0, dtype=torch.float32))
    counts[20, 1] = -1.0
    decoder = torch.nn.Linear(2, 4)
    encoder = torch.nn.Linear(4, 4)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(2), 1.0).to_event(1))
            rate = decoder(z).exp()
            pyro.sample("x", pyro.distributions.Poisson(rate).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = encoder(x).chunk(2, -1)
            pyro.sample("z", pyro.distributions.Normal(loc, raw.exp()).to_event(1))

    with pytest.raises(ValueError, match="row 20, column 1"):
        pvae.fit(model, guide, counts, epochs=1, batch_size=8, progress=False)


@pytest.mark.parametrize(
    "make, kind, match",
    [
        (lambda x: x.long(), TypeError, "train has dtype torch.int64"),
        (lambda x: x.half(), TypeError, "train has dtype torch.float16"),
        (lambda x: x > 0, TypeError, "train has dtype torch.bool"),
        (lambda x: x.double(), TypeError, "train has dtype torch.float64"),
        (lambda x: x[:, 0], ValueError, r"train: the model and guide failed on a batch of shape"),
        (lambda x: x[:, :, None], ValueError, r"train: .*shape"),
        (lambda x: torch.cat([x, x[:, :1]], 1), ValueError, r"train: .*\(16, 7\)"),
    ],
    ids=["int", "float16", "bool", "float64", "1-d", "3-d", "wrong width"],
)
def test_dtype_and_shape_mismatches_are_named(make, kind, match, x, make_pair):
    with pytest.raises(kind, match=match):
        fit(make_pair(), make(x))


@pytest.mark.parametrize(
    "make, kind, match",
    [
        (lambda x: x.double(), TypeError, "valid has dtype torch.float64"),
        (lambda x: x[:, :5], ValueError, r"valid has rows of shape \(5,\)"),
    ],
)
def test_valid_mismatches_are_named(make, kind, match, x, make_pair):
    with pytest.raises(kind, match=match):
        fit(make_pair(), x, valid=make(x))


def test_numpy_float64_data_is_converted(x, make_pair):
    run = fit(make_pair(), x.numpy().astype(np.float64))
    assert np.isfinite(run.train_bound[-1])


def test_a_list_of_row_tensors_is_refused(x, make_pair):
    with pytest.raises(TypeError, match=r"train is a list of 10 tensors.*torch.stack"):
        fit(make_pair(), list(x[:10]))


def test_a_guide_that_misses_a_latent_of_the_model_is_refused(x, make_pair):
    pair = make_pair()

    def model(x):
        pyro.sample("w", pyro.distributions.Normal(x.new_zeros(()), 1.0))
        pair.model(x)

    with pytest.raises(ValueError, match=r"\['w'\] that the guide does not sample"):
        pvae.fit(model, pair.guide, x, epochs=1, batch_size=16, progress=False)


@pytest.mark.parametrize("engine", [make() for make in ENGINES.values()], ids=list(ENGINES))
def test_engines_in_svi_refuse_a_guide_that_misses_a_latent(x, make_pair, engine):
    """Used directly in pyro.infer.SVI (no fit pre-check), every engine refuses on its first
    step, where Pyro's own ELBOs only warn and draw the latent from its prior."""
    pair = make_pair()

    def model(x):
        pyro.sample("w", pyro.distributions.Normal(x.new_zeros(()), 1.0))
        pair.model(x)

    svi = pyro.infer.SVI(model, pair.guide, pyro.optim.Adam({"lr": 1e-3}), loss=engine)
    with pytest.raises(ValueError, match=r"\['w'\] that the guide does not sample"):
        svi.step(x)


def test_engines_report_the_actual_cause_not_vectorisation(x, make_pair):
    pair = make_pair(plate=None)
    with pytest.raises(ValueError, match=r"pyro.plate\('data'") as error:
        IWAE(4).loss_and_grads(pair.model, pair.guide, x[:8])
    assert "vectorised particles" not in str(error.value)
    bad = x[:8].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError) as error:
        with pyro.validation_enabled(True):
            IWAE(4).loss_and_grads(make_pair().model, make_pair().guide, bad)
    assert "vectorised particles" not in str(error.value)


def test_a_subsampling_data_plate_probes_with_a_real_batch(x, make_pair):
    pair = make_pair()
    n, b = x.shape[0], 16

    def model(batch):
        pyro.module("decoder", pair.decoder)
        with pyro.plate("data", n, subsample_size=b) as idx:
            z = pyro.sample("z", pyro.distributions.Normal(batch.new_zeros(2), 1.0).to_event(1))
            loc = pair.decoder(z)
            pyro.sample("x", pyro.distributions.Normal(loc, 1.0).to_event(1), obs=batch[idx % b])

    def guide(batch):
        pyro.module("encoder", pair.encoder)
        with pyro.plate("data", n, subsample_size=b) as idx:
            loc, raw = pair.encoder(batch[idx % b]).chunk(2, -1)
            scale = torch.nn.functional.softplus(raw) + 1e-3
            pyro.sample("z", pyro.distributions.Normal(loc, scale).to_event(1))

    run = pvae.fit(model, guide, x, epochs=1, batch_size=b, progress=False)
    assert np.isfinite(run.train_bound[-1])


def test_a_pair_whose_guide_has_no_latents_trains():
    """A deterministic pair (no latent: an empty guide) is not refused because the model's data
    plate records an index site that the guide lacks."""
    decoder = torch.nn.Linear(2, 3)

    def model(x, y):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", pyro.distributions.Normal(decoder(x), 1.0).to_event(1), obs=y)

    def guide(x, y):
        pass

    x, y = torch.randn(20, 2), torch.randn(20, 3)
    run = pvae.fit(model, guide, (x, y), epochs=2, batch_size=10, progress=False)
    assert run.history[-1]["train_bound"] > run.history[0]["train_bound"] - 1.0
