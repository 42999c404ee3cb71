"""pvae.steps: the one dispatch from an engine to a step record, and the engine-state
interface, checked on the linear-Gaussian fixture whose exact guide makes the ELBO equal
log p(x) for every draw."""

import pyro
import pytest
import torch

from pvae.inference import ELBO, IWAE, LinearAnnealing
from pvae.steps import (
    NEGATIVE_LOSS,
    EngineState,
    StepEngine,
    StepRecord,
    engine_state,
    load_engine_state,
    reset_engine,
    step_function,
    train_step,
)


@pytest.mark.parametrize("engine", [ELBO(), IWAE(num_particles=3)], ids=["ELBO", "IWAE"])
def test_pvae_engines_report_the_bound_itself(linear_gaussian, engine):
    """With the exact posterior as guide every log weight is log p(x): bound = sum log p(x)."""
    x = linear_gaussian.sample(6)
    record = train_step(engine, linear_gaussian.model, linear_gaussian.guide, (x,))
    assert isinstance(record, StepRecord) and record.extras == {} and record.log_joint is None
    exact = linear_gaussian.log_px(x).sum().item()
    assert record.bound == pytest.approx(exact, rel=1e-9)
    assert engine.step == 1
    # loss_and_grads stays Pyro-compatible: the negative bound.
    assert engine.loss_and_grads(linear_gaussian.model, linear_gaussian.guide, x) == pytest.approx(
        -exact, rel=1e-9
    )
    assert engine.step == 2


@pytest.mark.parametrize(
    "engine",
    [pyro.infer.Trace_ELBO(), pyro.infer.TraceMeanField_ELBO(), pyro.infer.RenyiELBO(alpha=0.5)],
    ids=["Trace_ELBO", "TraceMeanField_ELBO", "RenyiELBO"],
)
def test_pyro_engines_report_their_negative_loss(linear_gaussian, engine):
    x = linear_gaussian.sample(6)
    step, source = step_function(engine)
    assert source == NEGATIVE_LOSS
    record = step(linear_gaussian.model, linear_gaussian.guide, (x,), {})
    assert record.bound == -record.loss
    assert record.extras == {"bound_source": NEGATIVE_LOSS}
    exact = linear_gaussian.log_px(x).sum().item()
    assert record.bound == pytest.approx(exact, rel=1e-9)
    assert engine_state(engine) == {}
    reset_engine(engine)  # no state: nothing to do


def test_engine_state_interface():
    engine = ELBO(beta=LinearAnnealing(num_steps=10))
    assert isinstance(engine, EngineState) and isinstance(engine, StepEngine)
    assert not isinstance(pyro.infer.Trace_ELBO(), EngineState)
    assert not isinstance(pyro.infer.Trace_ELBO(), StepEngine)
    engine.step = 7
    state = engine_state(engine)
    assert state == {"step": 7}
    other = ELBO(beta=LinearAnnealing(num_steps=10))
    load_engine_state(other, state)
    assert other.current_beta() == pytest.approx(0.7)
    reset_engine(other)
    assert other.step == 0 and other.current_beta() == 0.0
    other.step = 3
    load_engine_state(other, {})  # a checkpoint of an engine without state: start afresh
    assert other.step == 0
    with pytest.raises(ValueError, match="no load_state_dict"):
        load_engine_state(pyro.infer.Trace_ELBO(), {"step": 3})


def test_an_engine_without_a_step_is_refused():
    with pytest.raises(TypeError, match="engine must be"):
        step_function(torch.optim.Adam)
