"""The engine contracts fit relies on: engines declare the settings a resume must match
(``settings()``; Pyro's own ELBOs through a fallback), a user-written step policy gets a public
:class:`pvae.StepContext` and is checkpointed and resumed, and the data plate may carry
another name than "data" (``data_plate=``) with results bit-identical to "data"."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import LinearGaussian

import pvae
from pvae.inference import CIWAE, ELBO, IWAE, MIWAE, PIWAE, KalmanELBO, LinearAnnealing
from pvae.steps import attribute_settings, engine_settings, pyro_elbo_settings


class NamedPlatePair(LinearGaussian):
    """The conftest's linear-Gaussian pair (exact posterior guide) with its data plate named
    ``plate`` and a trainable offset ``b_hat`` in the model (so that ``fit`` has a parameter)."""

    def __init__(self, plate="data", **kwargs):
        super().__init__(**kwargs)
        self.plate = plate

    def model(self, x):
        shift = pyro.param("b_hat", torch.zeros(self.x_dim, dtype=x.dtype))
        with pyro.plate(self.plate, x.shape[0]):
            loc = torch.zeros(self.z_dim, dtype=x.dtype)
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            mean = z @ self.W.T + self.b + shift
            pyro.sample("x", dist.Normal(mean, self.noise).to_event(1), obs=x)

    def guide(self, x):
        mean, cov = self.posterior(x)
        with pyro.plate(self.plate, x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(cov)))


FIT = dict(epochs=2, batch_size=16, progress=False, lr=1e-2)


# -- settings ---------------------------------------------------------------------------------


class TemperedELBO(ELBO):
    """A user's engine with one setting more than the ELBO: declared in ``settings()``."""

    def __init__(self, temperature=1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def settings(self):
        return {**super().settings(), **attribute_settings(self, "temperature")}


def test_a_subclass_setting_is_checked_on_resume(tmp_path):
    pair, x = NamedPlatePair(), NamedPlatePair().sample(32)
    pvae.fit(pair.model, pair.guide, x, TemperedELBO(1.0), run_dir=tmp_path, **FIT)
    with pytest.raises(ValueError, match=r"engine\.temperature \(checkpoint 1\.0, now 2\.0\)"):
        pvae.fit(
            pair.model, pair.guide, x, TemperedELBO(2.0), run_dir=tmp_path, resume=True,
            **{**FIT, "epochs": 3},
        )  # fmt: skip
    # the same value resumes
    run = pvae.fit(
        pair.model, pair.guide, x, TemperedELBO(1.0), run_dir=tmp_path, resume=True,
        **{**FIT, "epochs": 3},
    )  # fmt: skip
    assert len(run.history) == 3


def test_engines_declare_the_settings_the_loops_listed():
    assert ELBO(num_particles=2, beta=0.5).settings() == {
        "num_particles": 2,
        "estimator": "reparam",
        "free_bits": 0.0,
        "analytic_kl": True,
        "beta": 0.5,
    }
    assert ELBO(beta=LinearAnnealing(5)).settings()["beta"] == repr(LinearAnnealing(5))
    assert "beta" not in ELBO(beta=lambda step: 1.0).settings()  # a function: no plain value
    assert IWAE(5, estimator="dreg").settings() == {
        "num_particles": 5,
        "num_outer": 1,
        "num_inner": 5,
        "estimator": "dreg",
    }
    assert MIWAE(2, 3).settings()["num_outer"] == 2
    assert CIWAE(4, beta=0.25).settings()["beta"] == 0.25
    assert PIWAE(2, 2, encoder_objective="elbo").settings()["encoder_objective"] == "elbo"
    assert KalmanELBO(exact_emissions=False).settings()["exact_emissions"] is False


def test_pyro_elbos_fall_back_to_their_public_attributes():
    renyi = pyro.infer.RenyiELBO(alpha=0.5, num_particles=3, max_plate_nesting=1)
    assert engine_settings(renyi) == {
        "num_particles": 3,
        "vectorize_particles": False,
        "max_plate_nesting": 1,
        "alpha": 0.5,
        "tail_adaptive_beta": -1.0,  # Pyro's default on every ELBO
    }
    assert "max_plate_nesting" not in pyro_elbo_settings(pyro.infer.Trace_ELBO())  # inf: guessed


def test_settings_must_be_plain_values():
    class Bad(ELBO):
        def settings(self):
            return {"net": torch.nn.Linear(1, 1)}

    with pytest.raises(TypeError, match=r"Bad\.settings\(\) must return a dict"):
        engine_settings(Bad())


# -- step policies ----------------------------------------------------------------------------


class ExtraGuideSteps(pvae.StepPolicy):
    """Before every training step, ``extra`` guide-only steps on the step's own batch; counts
    its calls (state that must survive a checkpoint)."""

    def __init__(self, extra=2):
        self.extra, self.calls, self.contexts = extra, 0, []

    def before_step(self, context):
        assert isinstance(context, pvae.StepContext)
        self.contexts.append((context.epoch, context.step))
        for _ in range(self.extra):
            context.engine.loss_and_grads(context.model, context.guide, *context.batch)
            context.update(context.guide_params)
        self.calls += 1

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


class GuidedPair(NamedPlatePair):
    """The pair with a trainable guide mean offset, so guide-only steps have work."""

    def guide(self, x):
        mean, cov = self.posterior(x)
        shift = pyro.param("q_shift", torch.zeros(self.z_dim, dtype=x.dtype))
        with pyro.plate(self.plate, x.shape[0]):
            tril = torch.linalg.cholesky(cov)
            pyro.sample("z", dist.MultivariateNormal(mean + shift, scale_tril=tril))


def _guide_shift():
    return pyro.param("q_shift").detach().clone()


def test_a_user_policy_is_called_checkpointed_and_resumed(tmp_path):
    pair = GuidedPair()
    x = pair.sample(32)
    plain = pvae.fit(pair.model, pair.guide, x, ELBO(), **{**FIT, "epochs": 3})
    plain_shift = _guide_shift()
    pyro.clear_param_store()
    policy = ExtraGuideSteps()
    whole = pvae.fit(pair.model, pair.guide, x, ELBO(), step_policy=policy, **{**FIT, "epochs": 3})
    whole_shift = _guide_shift()
    assert policy.calls == 3 * 2 and policy.contexts[:3] == [(0, 0), (0, 1), (1, 0)]
    assert not torch.equal(whole_shift, plain_shift)  # the extra guide steps changed the run
    pyro.clear_param_store()
    first = ExtraGuideSteps()
    pvae.fit(pair.model, pair.guide, x, ELBO(), step_policy=first, run_dir=tmp_path, **FIT)
    assert first.calls == 2 * 2
    pyro.clear_param_store()
    resumed_policy = ExtraGuideSteps()
    resumed = pvae.fit(
        pair.model, pair.guide, x, ELBO(), step_policy=resumed_policy, run_dir=tmp_path,
        resume=True, **{**FIT, "epochs": 3},
    )  # fmt: skip
    assert resumed_policy.calls == 3 * 2  # restored from the checkpoint, then two more
    assert torch.equal(_guide_shift(), whole_shift)  # bit-identical to the uninterrupted run
    assert resumed.train_bound == whole.train_bound
    assert plain.train_bound != whole.train_bound


def test_step_policy_arguments_are_checked(linear_gaussian):
    pair = NamedPlatePair()
    x = pair.sample(8)
    with pytest.raises(ValueError, match="step_policy or aggressive_encoder, not both"):
        pvae.fit(pair.model, pair.guide, x, step_policy=pvae.StepPolicy(), aggressive_encoder=2)
    with pytest.raises(TypeError, match="step_policy must be a pvae.StepPolicy"):
        pvae.fit(pair.model, pair.guide, x, step_policy=object())
    with pytest.raises(ValueError, match="aggressive_encoder must be a positive integer"):
        pvae.fit(pair.model, pair.guide, x, aggressive_encoder=0)


# -- the data plate's name --------------------------------------------------------------------


def _bounds(plate, engine):
    pair = NamedPlatePair(plate)
    x = pair.sample(24)
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    bound = pvae.evaluate_bound(pair.model, pair.guide, x, engine, 10, data_plate=plate)
    pyro.set_rng_seed(3)
    ll = pvae.log_likelihood(pair.model, pair.guide, x, num_samples=4, data_plate=plate)
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    run = pvae.fit(pair.model, pair.guide, x, engine, data_plate=plate, **FIT)
    exact = pair.log_px(x)
    return bound, ll, run, exact


@pytest.mark.parametrize("make_engine", [ELBO, lambda: IWAE(3)])
def test_a_renamed_data_plate_gives_the_same_numbers(make_engine):
    bound, ll, run, exact = _bounds("data", make_engine())
    renamed = _bounds("obs_plate", make_engine())
    assert renamed[0] == bound and torch.equal(renamed[1], ll)  # bit-identical
    steps = [(s["loss"], s["bound"]) for s in run.steps]
    assert [(s["loss"], s["bound"]) for s in renamed[2].steps] == steps
    assert renamed[2].params["b_hat"].equal(run.params["b_hat"])
    # With the exact posterior as the guide every importance weight is p(x), so both are
    # exact (to rounding) whatever the draws: the plate's N/B scaling is right.
    assert math.isclose(bound, float(exact.mean()), rel_tol=1e-9)
    assert torch.allclose(ll, exact, rtol=1e-9, atol=1e-9)


def test_a_wrong_plate_name_names_the_plates_found():
    pair = NamedPlatePair("obs_plate")
    x = pair.sample(8)
    with pytest.raises(ValueError, match=r"pyro\.plate\('data', \.\.\.\).*'obs_plate'"):
        pvae.fit(pair.model, pair.guide, x, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"pyro\.plate\('rows', \.\.\.\).*'obs_plate'"):
        pvae.evaluate_bound(pair.model, pair.guide, x, ELBO(), 4, data_plate="rows")
    with pytest.raises(ValueError, match=r"pyro\.plate\('rows', \.\.\.\).*'obs_plate'"):
        pvae.log_likelihood(pair.model, pair.guide, x, num_samples=2, data_plate="rows")
    with pytest.raises(TypeError, match="data_plate must be the name of a pyro.plate"):
        pvae.fit(pair.model, pair.guide, x, data_plate=3)


def test_the_engine_and_the_loop_must_agree_on_the_plate():
    pair = NamedPlatePair("obs_plate")
    x = pair.sample(8)
    engine = ELBO(data_plate="obs_plate")  # as a user stepping pyro.infer.SVI sets it
    pvae.fit(pair.model, pair.guide, x, engine, data_plate="obs_plate", **FIT)
    with pytest.raises(ValueError, match="reads the plate 'obs_plate'.*data_plate='other'"):
        pvae.fit(pair.model, pair.guide, x, engine, data_plate="other", **FIT)
    default = ELBO()
    pvae.fit(pair.model, pair.guide, x, default, data_plate="obs_plate", **FIT)
    assert default.data_plate == "data"  # set for the run only
    # the engine alone, in Pyro's own SVI
    svi = pyro.infer.SVI(pair.model, pair.guide, pyro.optim.Adam({"lr": 1e-2}), engine)
    assert math.isfinite(svi.step(x))
