"""The sampler contract pvae.sample relies on: :class:`pvae.SamplerEngine` (an abstract class,
as Pyro's ``MCMCKernel``), the sampler's own ``settings()`` checked on resume, and the data
plate's name (``data_plate=``)."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae
from pvae.inference import SGHMC, SamplerEngine
from pvae.steps import attribute_settings

OPTIONS = dict(num_samples=4, warmup=4, batch_size=8, progress=False)


def regression(plate):
    """y_n ~ N(w x_n, 1), w ~ N(0, 1), the datapoints in a plate named ``plate``."""

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate(plate, x.shape[0]):
            pyro.sample("y", dist.Normal(w * x, 1.0), obs=y)

    return model


def data(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    return x, 0.5 * x + torch.randn(n, generator=g)


def test_sghmc_is_a_sampler_engine():
    assert issubclass(SGHMC, SamplerEngine) and SamplerEngine is pvae.SamplerEngine
    assert SGHMC().settings() == {"lr": 0.05, "friction": 0.3, "adaptive": True, "init_radius": 2.0}
    with pytest.raises(TypeError, match="abstract"):
        SamplerEngine()  # type: ignore[abstract]


def test_an_object_that_is_no_sampler_engine_is_refused_naming_what_it_lacks():
    class Partial:
        def setup(self, *args, **kwargs):
            pass

        def train_step(self, *args, **kwargs):
            pass

    with pytest.raises(TypeError, match=r"Partial is not: it lacks \['load_state_dict', "):
        pvae.sample(regression("data"), data(), sampler=Partial(), **OPTIONS)

    class Undeclared(Partial):  # every method, but the contract is not declared
        values = unconstrained = state_dict = load_state_dict = reset = Partial.setup

    with pytest.raises(TypeError, match=r"SamplerEngine\.register"):
        pvae.sample(regression("data"), data(), sampler=Undeclared(), **OPTIONS)


class TemperedSGHMC(SGHMC):
    """A sampler with one setting more, declared in ``settings()``."""

    def __init__(self, temperature=1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def settings(self):
        return {**super().settings(), **attribute_settings(self, "temperature")}


def test_a_sampler_subclass_setting_is_checked_on_resume(tmp_path):
    model = regression("data")
    pvae.sample(model, data(), sampler=TemperedSGHMC(1.0), run_dir=tmp_path, **OPTIONS)
    with pytest.raises(ValueError, match=r"sampler\.temperature \(checkpoint 1\.0, now 2\.0\)"):
        pvae.sample(
            model, data(), sampler=TemperedSGHMC(2.0), run_dir=tmp_path, resume=True, **OPTIONS
        )


def test_a_renamed_data_plate_samples_the_same_chain():
    """Minibatched (8 of 16 rows): the plate's N/B scaling must find the renamed plate, or
    the chains differ."""
    same = pvae.sample(regression("data"), data(), sampler=SGHMC(), seed=1, **OPTIONS)
    renamed = pvae.sample(
        regression("rows"), data(), sampler=SGHMC(), seed=1, data_plate="rows", **OPTIONS
    )
    assert torch.equal(same.samples["w"], renamed.samples["w"])
    assert torch.equal(same.log_joint, renamed.log_joint)
    with pytest.raises(ValueError, match=r"pyro\.plate\('data', \.\.\.\).*'rows'"):
        pvae.sample(regression("rows"), data(), sampler=SGHMC(), **OPTIONS)
