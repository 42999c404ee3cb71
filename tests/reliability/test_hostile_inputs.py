"""Hostile input to the i.i.d. half and to ``pvae train``/``compare`` (issue 19, section 4):
every refusal comes before anything is written, engines reused across pairs forget the last
pair, a non-finite gradient is named by epoch and step, and nonsense arguments to
``pvae.data.load`` or data on the meta device are refused with the argument's name."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae
from pvae import data
from pvae.app import cli
from pvae.inference import CIWAE, ELBO, IWAE, MIWAE, PIWAE, KalmanELBO

ENGINES = {
    "elbo": lambda: ELBO(num_particles=2),
    "iwae": lambda: IWAE(3),
    "miwae": lambda: MIWAE(2, 2),
    "ciwae": lambda: CIWAE(3, beta=0.5),
    "piwae": lambda: PIWAE(2, 2),
}

# -- the command line: refusals before anything is written -----------------------------------

SMALL = {"pendulum": {"sizes": (6, 4, 4), "num_steps": 5, "size": 8}, "lds": {"sizes": (6, 4, 4)}}


@pytest.fixture
def small_sequences(monkeypatch):
    """The sequence sets the CLI loads, made tiny (the refusals do not depend on size)."""
    load = data.load

    def small(name, **kwargs):
        return load(name, **{**SMALL.get(name, {}), **kwargs})

    monkeypatch.setattr(cli.data, "load", small)


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("pvae: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


TINY = ["--z-dim", "2", "--hidden", "8", "--epochs", "1", "--ll-samples", "2", "--quiet"]
MISMATCHES = [  # (arguments, what the one line must say)
    (["train", "--dataset", "pendulum", "--model", "kvae"], "x_dim"),  # image frames, flat model
    # the kalman engine with another model: refused while parsing (names the models it takes)
    (["train", "--dataset", "digits", "--engine", "kalman"], "state-space guide (svae, mgpvae)"),
    (["train", "--dataset", "lds", "--model", "kvae", "--engine", "kalman"], "state-space"),
    (["train", "--dataset", "lds", "--model", "gpvae", "--engine", "kalman"], "state-space"),
    (["compare", "--dataset", "pendulum", "--model", "kvae", "--quick"], "x_dim"),
    (["compare", "--dataset", "digits", "--bounds", "elbo,kalman", "--quick"], "kalman engine"),
]


@pytest.mark.parametrize("argv, says", MISMATCHES, ids=[" ".join(a[:5]) for a, _ in MISMATCHES])
def test_a_model_engine_or_data_mismatch_is_refused_before_the_run_folder_exists(
    argv, says, small_sequences, tmp_path, capsys
):
    run_dir = tmp_path / "new" / "run"  # neither folder exists
    assert cli.main([*argv, *TINY, "--run-dir", str(run_dir)]) == 2
    line = error_line(capsys)
    assert says in line and "--model" in line
    assert list(tmp_path.iterdir()) == []  # no run folder, no parent folder, no config.json


def test_a_mismatch_in_an_existing_folder_leaves_it_as_found(small_sequences, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    argv = ["train", "--dataset", "lds", "--model", "gpvae", "--engine", "kalman", *TINY]
    assert cli.main([*argv, "--run-dir", str(tmp_path)]) == 2
    error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_run_dir_that_cannot_be_created_is_refused_before_any_work(command, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    argv = [command, "--dataset", "digits", *TINY, "--run-dir", str(tmp_path / "a-file" / "r")]
    assert cli.main(argv) == 2
    assert "a-file is not a folder" in error_line(capsys)


# -- engines reused across pairs ---------------------------------------------------------------


def one_plate_model(x):
    shift = pyro.param("shift", torch.zeros(3))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z + shift, 1.0).to_event(1), obs=x)


def one_plate_guide(x):
    loc = pyro.param("loc", torch.zeros(3))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc + x / 2, 0.8).to_event(1))


def two_plate_model(x):
    shift = pyro.param("shift2", torch.zeros(3))
    with pyro.plate("dims", 3, dim=-1), pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + shift, 1.0), obs=x)


def two_plate_guide(x):
    loc = pyro.param("loc2", torch.zeros(3))
    with pyro.plate("dims", 3, dim=-1), pyro.plate("data", x.shape[0], dim=-2):
        pyro.sample("z", dist.Normal(loc + x / 2, 0.8))


def bound(engine, model, guide, x):
    pyro.set_rng_seed(5)
    return engine.loss(model, guide, x)


@pytest.mark.parametrize("name", ENGINES)
def test_an_engine_reused_from_a_one_plate_pair_trains_a_two_plate_pair(name):
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    engine = ENGINES[name]()
    pvae.fit(
        one_plate_model, one_plate_guide, x, engine=engine, epochs=1, batch_size=10, progress=False
    )
    pvae.fit(
        two_plate_model, two_plate_guide, x, engine=engine, epochs=1, batch_size=10, progress=False
    )
    # The same engine object gives the fresh engine's number, per pair and after reset().
    for model, guide in ((one_plate_model, one_plate_guide), (two_plate_model, two_plate_guide)):
        assert bound(engine, model, guide, x) == bound(ENGINES[name](), model, guide, x)
    engine.reset()
    assert engine.max_plate_nesting == float("inf")  # guessed again from the next pair
    assert bound(engine, two_plate_model, two_plate_guide, x) == bound(
        ENGINES[name](), two_plate_model, two_plate_guide, x
    )


def test_a_given_plate_nesting_is_kept_across_pairs_and_resets():
    engine = IWAE(3, max_plate_nesting=2)
    x = torch.randn(8, 3)
    engine.loss(one_plate_model, one_plate_guide, x)
    engine.reset()
    engine.loss(two_plate_model, two_plate_guide, x)
    assert engine.max_plate_nesting == 2


# -- divergence: named by epoch and step -------------------------------------------------------


def nan_gradient_at(pair, call):
    """A NaN gradient (the bound stays finite) on the decoder at backward pass ``call``."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == call else grad

    pair.decoder.weight.register_hook(hook)


@pytest.mark.parametrize("run_dir", [False, True])
def test_a_nan_gradient_on_an_epochs_last_step_with_valid_names_epoch_and_step(
    run_dir, x, make_pair, tmp_path
):
    pair = make_pair()
    nan_gradient_at(pair, 4)  # 64 rows / 32: backward pass 4 is epoch 1, step 1, its last
    with pytest.raises(pvae.TrainingDiverged) as error:
        pvae.fit(
            pair.model, pair.guide, x, valid=x[:16], epochs=3, batch_size=32, progress=False,
            run_dir=tmp_path / "r" if run_dir else None,
        )  # fmt: skip
    message = str(error.value)
    assert "epoch 1, step 1" in message and "last step" in message and "decoder" in message
    assert "validation" not in message  # the validation pass ran into it before: not any more
    if run_dir:
        assert "checkpoint of epoch 0" in message
        assert pvae.load_checkpoint(tmp_path / "r" / "checkpoint.pt")["epoch"] == 0


def test_a_nan_gradient_mid_epoch_names_the_update_that_made_it(x, make_pair):
    pair = make_pair()
    nan_gradient_at(pair, 1)  # epoch 0, step 0: step 1 then starts from NaN parameters
    with pytest.raises(pvae.TrainingDiverged, match="in the update of epoch 0, step 0"):
        pvae.fit(pair.model, pair.guide, x, valid=x[:16], epochs=2, batch_size=32, progress=False)


def test_a_nan_validation_bound_names_the_epoch(x, make_pair):
    pair = make_pair()

    def model(x):
        pair.model(x)
        if not torch.is_grad_enabled() and x.shape[0] == 16:  # NaN in validation only
            pyro.factor("nan", x.new_tensor(float("nan")))

    with pytest.raises(pvae.TrainingDiverged, match="validation bound became nan after epoch 0"):
        pvae.fit(model, pair.guide, x, valid=x[:16], epochs=2, batch_size=32, progress=False)


# -- fit, check_fit, evaluate_bound, log_likelihood: refused up front --------------------------


def test_fit_refuses_an_engine_that_does_not_apply_before_creating_run_dir(x, make_pair, tmp_path):
    pair = make_pair()
    with pytest.raises(ValueError, match="KalmanSmoothedPosterior"):
        pvae.fit(
            pair.model, pair.guide, x, engine=KalmanELBO(), run_dir=tmp_path / "r", progress=False
        )
    assert not (tmp_path / "r").exists()


def test_check_fit_leaves_the_store_the_generators_and_the_engine_as_found(x, make_pair):
    pair = make_pair()
    engine = ELBO(beta=0.5)
    engine.step = 7
    torch.manual_seed(3)
    before = torch.get_rng_state()
    pvae.check_fit(pair.model, pair.guide, x, engine, batch_size=16, valid=x[:8])
    assert torch.equal(torch.get_rng_state(), before)
    assert len(pyro.get_param_store()) == 0 and engine.step == 7
    with pytest.raises(ValueError, match="KalmanSmoothedPosterior"):
        pvae.check_fit(pair.model, pair.guide, x, KalmanELBO())


@pytest.mark.parametrize(
    "kwargs, error, says",
    [
        ({"callbacks": [1]}, TypeError, "callbacks must hold callables"),
        ({"callbacks": print}, TypeError, "callbacks must be a list"),
        ({"step_callbacks": None}, TypeError, "step_callbacks must be a list"),
        ({"progress": "yes"}, TypeError, "progress must be True or False"),
    ],
)
def test_fit_refuses_callbacks_that_are_not_before_training(
    kwargs, error, says, x, make_pair, tmp_path
):
    pair = make_pair()
    with pytest.raises(error, match=says):
        pvae.fit(
            pair.model,
            pair.guide,
            x,
            epochs=1,
            run_dir=tmp_path / "r",
            **{"progress": False, **kwargs},
        )
    assert not (tmp_path / "r").exists()


API = {
    "fit": lambda p, d: pvae.fit(p.model, p.guide, d, epochs=1, progress=False),
    "check_fit": lambda p, d: pvae.check_fit(p.model, p.guide, d),
    "log_likelihood": lambda p, d: pvae.log_likelihood(p.model, p.guide, d, num_samples=2),
    "evaluate_bound": lambda p, d: pvae.evaluate_bound(p.model, p.guide, d, ELBO()),
}


@pytest.mark.parametrize("call", API)
def test_data_on_the_meta_device_is_refused(call, make_pair):
    with pytest.raises(ValueError, match="on the meta device"):
        API[call](make_pair(), torch.empty(20, 6, device="meta"))


@pytest.mark.parametrize(
    "bad, error, says",
    [
        (torch.randn(20, 6).double(), TypeError, "data has dtype torch.float64"),
        (torch.randn(20, 5), ValueError, "rows of data must have the shape"),
        (torch.full((20, 6), float("nan")), ValueError, "non-finite value"),
    ],
)
def test_evaluate_bound_checks_its_data_as_fit_does(bad, error, says, make_pair):
    with pytest.raises(error, match=says):
        pvae.evaluate_bound(make_pair().model, make_pair().guide, bad, ELBO())


def test_evaluate_bound_refuses_a_pair_without_a_data_plate(x, make_pair):
    pair = make_pair(plate="batch")
    with pytest.raises(ValueError, match=r"evaluate_bound.*pyro.plate\('data'"):
        pvae.evaluate_bound(pair.model, pair.guide, x, ELBO())


# -- pvae.data.load ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, error, says",
    [
        ("digits", {"seed": -1}, ValueError, "seed must be an integer >= 0"),
        ("digits", {"seed": 1.5}, ValueError, "seed must be an integer >= 0"),
        ("digits", {"seed": True}, TypeError, "seed must be"),
        ("digits", {"seed": None}, TypeError, "seed must be"),
        ("digits", {"seed": 2**33}, ValueError, "seed must be at most"),
        ("lds", {"seed": "3"}, TypeError, "seed must be"),
        ("lds", {"num_steps": True}, TypeError, "num_steps must be an integer"),
        ("lds", {"noise": float("nan")}, ValueError, "noise must be a finite number"),
        ("lds", {"rotation": float("inf")}, ValueError, "rotation must be a finite number"),
        ("lds", {"decay": True}, TypeError, "decay must be a real number"),
        ("linear-gaussian", {"z_dim": 1.5}, TypeError, "z_dim must be an integer"),
        ("pendulum", {"irregular": "yes"}, TypeError, "irregular must be True or False"),
        ("oscillators", {"system": 3}, TypeError, "system must be a string"),
        ("sines-30", {"bogus": 1}, TypeError, "unexpected keyword argument"),
        ("sines-30", {"seed": -2}, ValueError, "seed must be"),
    ],
)
def test_load_refuses_nonsense_naming_the_argument(name, kwargs, error, says):
    with pytest.raises(error, match=says) as raised:
        data.load(name, **kwargs)
    assert f"load({name!r})" in str(raised.value)


@pytest.mark.parametrize("name", ["rotating-digits", "hmnist-like"])
def test_rotating_digit_sets_load_with_empty_valid_and_test_splits(name):
    ds = data.load(name, sizes=(2, 0, 0), num_steps=4)
    assert ds.train.values.shape[:2] == (2, 4)
    assert ds.valid.values.shape[0] == 0 and ds.test.values.shape[0] == 0


def test_compare_refuses_a_bound_that_does_not_apply_before_writing(tmp_path):
    from pvae.app import compare

    ds = data.load("linear-gaussian", n=60, x_dim=4, z_dim=2)
    with pytest.raises(ValueError, match="bound 'kalman'.*KalmanSmoothedPosterior"):
        config = compare.run_config(
            "linear-gaussian", quick=True, bounds=["elbo", "kalman"], particles=2, z_dim=2,
            hidden=(8,),
        )  # fmt: skip
        compare.compare(config, run_dir=tmp_path / "r", progress=False, ds=ds)
    assert not (tmp_path / "r").exists()
