"""The model/guide protocol: an unsized data plate, parameter ownership by use, and
parameters that Pyro's global store swapped."""

import functools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import LinearGaussian
from engine_cases import ENGINES as SHARED_ENGINES
from torch import nn

import pvae
from pvae.inference import ELBO, IWAE, PIWAE
from pvae.protocol import find_data_frame, param_split, scale_to_data, trace_pair

# the shared engines, and DReG gradients of the guide's IWAE and PIWAE objectives
ENGINES = {
    **SHARED_ENGINES,
    "IWAE-dreg": functools.partial(SHARED_ENGINES["IWAE"], "dreg"),
    "PIWAE-dreg": functools.partial(SHARED_ENGINES["PIWAE"], "dreg"),
}


# ---- an unsized pyro.plate("data") ---------------------------------------------------------


class PlatePair:
    """A small Gaussian VAE whose data plate is sized by the batch (``sized``) or not sized at
    all (``pyro.plate("data")``, as in Pyro's CVAE and SS-VAE examples)."""

    def __init__(self, sized: bool, x_dim=5, z_dim=2):
        torch.manual_seed(0)
        self.sized, self.z_dim = sized, z_dim
        self.encoder = nn.Linear(x_dim, 2 * z_dim)
        self.decoder = nn.Linear(z_dim, x_dim)

    def plate(self, x):
        return pyro.plate("data", x.shape[0]) if self.sized else pyro.plate("data")

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with self.plate(x):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_unsized_plate_is_scaled_by_the_batch_it_holds():
    x = torch.randn(7, 5)
    traces = {}
    for sized in (True, False):
        pair = PlatePair(sized)
        model, guide = scale_to_data(pair.model, 70), scale_to_data(pair.guide, 70)
        traces[sized] = trace_pair(model, guide, (x,))
    for sized in (True, False):
        for trace in traces[sized]:
            for name in ("z", "x"):
                if name in trace.nodes:
                    assert trace.nodes[name]["scale"] == pytest.approx(10.0), (sized, name)
        frame = find_data_frame(*traces[sized])
        assert (frame.size, frame.full_size) == (7, 70)
    # without scale_to_data the unsized frame's size is read from its sites
    frame = find_data_frame(*trace_pair(PlatePair(False).model, PlatePair(False).guide, (x,)))
    assert (frame.size, frame.full_size) == (7, 7)


@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_unsized_plate_fits_like_the_sized_one(engine_name):
    """The unsized plate used to get scale -N: a bound of +1e19 nats or NaN."""
    x = torch.randn(60, 5)
    runs = {}
    for sized in (True, False):
        pyro.clear_param_store()
        pair = PlatePair(sized)
        runs[sized] = pvae.fit(
            pair.model, pair.guide, x, ENGINES[engine_name](), epochs=2, batch_size=25,
            progress=False,
        )  # fmt: skip
    bounds = [s["bound"] for s in runs[False].steps]
    assert all(math.isfinite(b) and b < 0 for b in bounds), bounds
    assert bounds == pytest.approx([s["bound"] for s in runs[True].steps], rel=1e-6)


def test_log_likelihood_with_an_unsized_plate_is_exact():
    lg = LinearGaussian()

    def model(x):
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], lg.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.noise).to_event(1), obs=x)

    def guide(x):
        mean, cov = lg.posterior(x)
        with pyro.plate("data"):
            pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(cov)))

    x = lg.sample(9)
    estimate = pvae.log_likelihood(model, guide, x, num_samples=5, batch_size=4)
    torch.testing.assert_close(estimate, lg.log_px(x), rtol=0, atol=1e-9)


# ---- ownership by use ----------------------------------------------------------------------


class RegisteredPair:
    """A linear-Gaussian VAE with nn.Module encoder and decoder. ``in_model=True`` registers
    both networks in the model and none in the guide (as Pyro's CVAE example does);
    otherwise each side registers its own."""

    def __init__(self, in_model: bool, x_dim=5, z_dim=2):
        torch.manual_seed(0)
        self.in_model, self.z_dim = in_model, z_dim
        self.encoder = nn.Linear(x_dim, 2 * z_dim).double()
        self.decoder = nn.Linear(z_dim, x_dim).double()
        self.nets = nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder})

    def model(self, x):
        if self.in_model:
            pyro.module("nets", self.nets)
        else:
            pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.7).to_event(1), obs=x)

    def guide(self, x):
        if not self.in_model:
            pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def gradients(engine, in_model, x, seed=0):
    """The modules' gradients after one loss_and_grads, by module and parameter name."""
    pyro.clear_param_store()
    pair = RegisteredPair(in_model)
    pyro.set_rng_seed(seed)
    engine.loss_and_grads(pair.model, pair.guide, x)
    return {
        f"{net}.{name}": p.grad.clone()
        for net, module in pair.nets.items()
        for name, p in module.named_parameters()
    }


def guide_part(grads):
    return torch.cat([g.reshape(-1) for n, g in grads.items() if n.startswith("encoder")])


@pytest.mark.filterwarnings("ignore:.*estimator='stl' and K > 1")
def test_encoder_registered_in_the_model_gets_the_guides_gradient():
    x = LinearGaussian().sample(6)
    engines = {
        "dreg": lambda: IWAE(5, estimator="dreg"),
        "stl": lambda: IWAE(5, estimator="stl"),
        "piwae": lambda: PIWAE(2, 3),
        "iwae": lambda: IWAE(6),
    }
    grads = {(name, in_model): gradients(make(), in_model, x)
             for name, make in engines.items() for in_model in (True, False)}  # fmt: skip
    for name in engines:  # the same gradients whichever side registered the encoder
        for key, grad in grads[(name, False)].items():
            torch.testing.assert_close(grads[(name, True)][key], grad, rtol=1e-12, atol=1e-14)
    # ... and they are the engines' own: DReG is not STL, PIWAE's guide is not IWAE's
    for a, b in [("dreg", "stl"), ("piwae", "iwae")]:
        difference = (guide_part(grads[(a, True)]) - guide_part(grads[(b, True)])).abs().max()
        assert difference > 1e-3, (a, b)


def test_param_split_follows_use_and_is_computed_once(monkeypatch):
    x = LinearGaussian().sample(4)
    pair = RegisteredPair(in_model=True)
    model_params, guide_params = param_split(pair.model, pair.guide, (x,))
    assert sorted(guide_params) == ["nets$$$encoder.bias", "nets$$$encoder.weight"]
    assert sorted(model_params) == ["nets$$$decoder.bias", "nets$$$decoder.weight"]
    # the engines use the same rule, read from the graph on the first step only
    import pvae.inference.base as base

    calls = []
    original = base.used_by_guide
    monkeypatch.setattr(base, "used_by_guide", lambda *a: calls.append(1) or original(*a))
    engine = PIWAE(2, 2)
    for _ in range(3):
        engine.loss_and_grads(pair.model, pair.guide, x)
    assert len(calls) == 1


def test_a_parameter_feeding_both_sides_is_the_models_with_a_warning():
    """A parameter in the guide's latents and the model's densities stays the model's (a
    ladder guide's top-down prior, a prior used as a proposal)."""
    shared = torch.tensor(0.0, requires_grad=True)

    def model(x):
        log_noise = pyro.param("log_noise", shared)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, log_noise.exp()), obs=x)

    def guide(x):
        log_noise = pyro.param("log_noise", shared)
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_noise.exp()))

    with pytest.warns(UserWarning, match=r"\['log_noise'\] feed both"):
        model_params, guide_params = param_split(model, guide, (torch.zeros(3),))
    assert list(guide_params) == ["loc"] and list(model_params) == ["log_noise"]


def test_a_guide_only_pair_does_not_warn():
    pair = RegisteredPair(in_model=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_params, guide_params = param_split(
            pair.model, pair.guide, (torch.zeros(3, 5, dtype=torch.float64),)
        )
    assert sorted(guide_params) == ["encoder$$$bias", "encoder$$$weight"]


# ---- two models with one name ---------------------------------------------------------------


class NamedPair(pyro.nn.PyroModule):
    """A PyroModule pair: its parameters are named by attribute ("decoder.weight", ...), so two
    instances share names in Pyro's global store."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(5, 4)
        self.decoder = nn.Linear(2, 5)

    @pyro.nn.pyro_method
    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    @pyro.nn.pyro_method
    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


class ModulePair(PlatePair):
    def __init__(self):
        super().__init__(sized=True)


@pytest.mark.parametrize("make", [NamedPair, ModulePair], ids=["PyroModule", "pyro.module"])
def test_a_second_model_with_the_same_names_is_refused(make):
    x = torch.randn(20, 5)
    first = make()
    pvae.fit(first.model, first.guide, x, epochs=1, batch_size=10, progress=False)
    second = make()
    with pytest.raises(ValueError, match=r"'(decoder|encoder)\S*' in Pyro's parameter store"):
        pvae.fit(second.model, second.guide, x, epochs=1, batch_size=10, progress=False)
    pyro.clear_param_store()  # the fix the message suggests: now the second one trains its own
    initial = second.decoder.weight.detach().clone()
    run = pvae.fit(second.model, second.guide, x, epochs=1, batch_size=10, progress=False)
    assert not torch.equal(second.decoder.weight.detach(), initial)
    assert math.isfinite(run.train_bound[0])


def test_masked_sites_scale_by_n_over_b_once():
    """A site that carries its own mask (``poutine.mask``) takes the general reduction path:
    under ``scale_to_data(N)`` a batch of B counts N/B times, once. With the same draws, the
    scaled bound is exactly N/B times the unscaled one (no global terms)."""
    decoder = torch.nn.Linear(2, 3)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([True, False, True, True, False, True, True, True])

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            with pyro.poutine.mask(mask=keep[: x.shape[0]]):
                pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x[..., :2], 0.5).to_event(1))

    bounds = []
    for pair in ((model, guide), (pvae.scale_to_data(model, 40), pvae.scale_to_data(guide, 40))):
        pyro.set_rng_seed(0)
        bounds.append(-ELBO(analytic_kl=False).loss(pair[0], pair[1], x))
    assert bounds[1] == pytest.approx(5.0 * bounds[0], rel=1e-6)
