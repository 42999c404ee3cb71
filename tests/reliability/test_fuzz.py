"""Property-based fuzzing (hypothesis): random bad tensors and arguments fed to fit,
log_likelihood and every engine either raise a ValueError/TypeError naming what is wrong, or
give a finite result; a run folder never holds a checkpoint that fails to load or holds
non-finite values."""

import math
import tempfile
from pathlib import Path

import pyro
import pytest
import torch
from engine_cases import ENGINES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pvae
from pvae.inference import ELBO, IWAE

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.5, 1e30]


@st.composite
def bad_data(draw):
    rows = draw(st.integers(0, 12))
    width = draw(st.sampled_from([6, 6, 6, 5, 7]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.int64]))
    data = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
    for _ in range(draw(st.integers(0, 2))):
        if rows:
            data[draw(st.integers(0, rows - 1)), draw(st.integers(0, width - 1))] = draw(
                st.sampled_from(SPECIAL)
            )
    if dtype is torch.int64:
        data = data.nan_to_num(0.0, 0.0, 0.0).clamp(-5, 5)
    return data.to(dtype)


ARGUMENT = st.one_of(
    st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True), st.just("3")
)

NAMES = ("train", "data", "batch_size", "epochs", "num_samples", "chunk_size", "lr", "seed")


def refused_well(error: Exception) -> bool:
    return isinstance(error, ValueError | TypeError) and any(n in str(error) for n in NAMES)


def check_run_dir(run_dir: Path) -> None:
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        state = pvae.load_checkpoint(checkpoint)  # refuses non-finite values itself
        assert all(torch.isfinite(v).all() for v in state["params"].values())


@SETTINGS
@given(data=bad_data(), batch_size=ARGUMENT, lr=ARGUMENT, engine=st.sampled_from(sorted(ENGINES)))
def test_fit(make_pair, data, batch_size, lr, engine):
    pyro.clear_param_store()
    pair = make_pair()
    with tempfile.TemporaryDirectory() as folder:
        try:
            run = pvae.fit(
                pair.model,
                pair.guide,
                data,
                engine=ENGINES[engine](),
                epochs=1,
                batch_size=batch_size,
                lr=lr,
                run_dir=folder,
                progress=False,
            )
        except pvae.TrainingDiverged:
            pass  # a huge learning rate may diverge; the folder must still be clean
        except Exception as error:  # noqa: BLE001
            assert refused_well(error), repr(error)
        else:
            assert math.isfinite(run.train_bound[-1])
        check_run_dir(Path(folder))


@SETTINGS
@given(data=bad_data(), num_samples=ARGUMENT, chunk_size=ARGUMENT, batch_size=ARGUMENT)
def test_log_likelihood(make_pair, data, num_samples, chunk_size, batch_size):
    pyro.clear_param_store()
    pair = make_pair()
    try:
        ll = pvae.log_likelihood(
            pair.model,
            pair.guide,
            data,
            num_samples=num_samples,
            chunk_size=chunk_size,
            batch_size=batch_size,
        )
    except Exception as error:  # noqa: BLE001
        assert refused_well(error), repr(error)
    else:
        assert torch.isfinite(ll).all()


@SETTINGS
@given(value=ARGUMENT, argument=st.sampled_from(["num_particles", "beta", "free_bits"]))
def test_engine_constructors(value, argument):
    make = {"num_particles": IWAE, "beta": ELBO, "free_bits": ELBO}[argument]
    try:
        engine = make(**{argument: value})
    except (ValueError, TypeError) as error:
        assert argument in str(error)
    else:
        assert math.isfinite(float(getattr(engine, argument)))


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engines_on_a_bad_batch(make_pair, engine):
    pair = make_pair(plate="batch")
    with pytest.raises(ValueError, match=r"pyro.plate\('data'"):
        ENGINES[engine]().loss_and_grads(pair.model, pair.guide, torch.randn(5, 6))
