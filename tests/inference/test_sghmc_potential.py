"""SGHMC's fast potential (:mod:`pvae.potential`) against the traced log joint.

The reference is Pyro's own: ``poutine.trace(poutine.condition(model, values))``'s
``log_prob_sum()`` plus the log-abs-det Jacobian of every transformed site, differentiated by
autograd. Everything runs in float64, where the fast potential (closed-form Normal priors,
scales applied after the sum) differs from it only by the order of the sums: agreement to
1e-10 relative (the observed gaps are about 1e-15).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroSample
from torch.distributions import biject_to

import pvae
import pvae.potential
from pvae.inference import SGHMC
from pvae.models import BayesianAE

RTOL = 1e-10


@pytest.fixture(autouse=True)
def float64():
    """Priors written with Python numbers draw float64 values."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def traced_log_joint(model, sampler, args):
    """Pyro's log joint at the sampler's state (unconstrained, Jacobian included) and its
    gradient with respect to the unconstrained tensors."""
    theta = [t.detach().clone().requires_grad_(True) for t in sampler.theta]
    values, jacobian = {}, 0.0
    for name, transform, t in zip(sampler.names, sampler.transforms, theta, strict=True):
        value = transform(t)
        values[name] = value
        jacobian = jacobian + transform.log_abs_det_jacobian(t, value).sum()
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args)
    total = trace.log_prob_sum() + jacobian
    return total.detach(), torch.autograd.grad(total, theta)


def fast_log_joint(model, sampler, args):
    total = sampler.log_joint(model, *args)
    return total.detach(), torch.autograd.grad(total, sampler.theta)


def assert_agree(model, sampler, args):
    assert sampler.potential is not None  # the fast path is on (it passed its setup check)
    value, grads = fast_log_joint(model, sampler, args)
    ref_value, ref_grads = traced_log_joint(model, sampler, args)
    assert value.dtype == torch.float64
    assert abs(float(value - ref_value)) <= RTOL * abs(float(ref_value))
    for g, r in zip(grads, ref_grads, strict=True):
        assert float((g - r).abs().max()) <= RTOL * float(r.abs().max())


def small_bae():
    torch.manual_seed(0)
    bae = BayesianAE(x_dim=12, z_dim=3, hidden=(7,), prior_scale={"decoder.0": 0.5}).double()
    x = (torch.rand(20, 12, dtype=torch.float64) > 0.5).double()
    return bae, x


def test_bayesian_ae_closed_form_priors_match_trace():
    bae, x = small_bae()
    model = pvae.scale_to_data(bae.model, 100)  # 20 of 100 datapoints: scale 5
    sampler = SGHMC()
    sampler.setup(model, (x,), num_data=100, seed=1)
    potential = sampler.potential
    assert potential is not None
    # every weight and bias prior is a fixed PyroSample Normal: all take the closed form
    assert sorted(potential.forms) == sorted(n for pair in bae.site_names for n in pair)
    for batch in (x, x[:7]):  # a second batch size: another N/B, same potential
        assert_agree(model, sampler, (batch,))
    assert potential.rebuilds == 0


def test_closed_form_is_what_fails_when_wrong(monkeypatch):
    """A wrong closed form (its constant off by 1e-6 per weight) fails the setup's check:
    the sampler warns and keeps the traced log joint."""
    bae, x = small_bae()
    monkeypatch.setattr(pvae.potential, "_HALF_LOG_TWO_PI", pvae.potential._HALF_LOG_TWO_PI + 1e-6)
    sampler = SGHMC()
    with pytest.warns(RuntimeWarning, match="fast potential"):
        sampler.setup(pvae.scale_to_data(bae.model, 100), (x,), num_data=100, seed=1)
    assert sampler.potential is None


def regression(x, y):
    w = pyro.sample("w", dist.Normal(0.5, 3.0).expand([x.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))  # transformed: a Jacobian term
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, sigma), obs=y)


def regression_data(n=50, d=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64) + torch.randn(
        n, generator=g, dtype=torch.float64
    )


def test_linear_regression_minibatch_scale_matches_trace():
    x, y = regression_data()
    model = pvae.scale_to_data(regression, 50)
    sampler = SGHMC()
    sampler.setup(model, (x[:10], y[:10]), num_data=50, seed=0)
    for rows in (slice(0, 10), slice(10, 20), slice(0, 50)):  # N/B = 5, 5 and 1
        assert_agree(model, sampler, (x[rows], y[rows]))
    # the prior is built anew at every call: computed by log_prob, not a structure change
    assert "w" not in sampler.potential.forms
    assert sampler.potential.rebuilds == 0


def subsampled(x, y, rows):
    w = pyro.sample("w", dist.Normal(0.0, 2.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample=rows) as index:
        pyro.sample("y", dist.Normal(x[index] @ w, 1.0), obs=y[index])


def test_subsampled_plate_matches_trace():
    """A plate that subsamples itself (its scale N/B set by Pyro's plate, not by pvae)."""
    x, y = regression_data()
    rows = torch.arange(0, 50, 5)
    sampler = SGHMC()
    sampler.setup(subsampled, (x, y, rows), seed=0)
    for r in (rows, torch.arange(3, 50, 7)):
        assert_agree(subsampled, sampler, (x, y, r))


class Changing(PyroModule):
    """A model whose structure changes between calls: an extra observed site on request, and
    a prior object that can be replaced."""

    def __init__(self):
        super().__init__()
        self.w = PyroSample(dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        self.extra = False

    def forward(self, y):
        w = self.w
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(w, 1.0), obs=y)
        if self.extra:
            pyro.sample("y2", dist.Normal(2 * w, 0.5), obs=y[:3])


def test_structure_change_falls_back_and_relearns():
    torch.manual_seed(0)
    model = Changing()
    y = torch.randn(8, dtype=torch.float64) + 1.0
    sampler = SGHMC()
    sampler.setup(model, (y,), seed=0)
    potential = sampler.potential
    assert "w" in potential.forms and potential.builds == 1
    assert_agree(model, sampler, (y,))

    model.extra = True  # a site added: a new signature, learned again
    assert_agree(model, sampler, (y,))
    assert potential.rebuilds == 1 and potential.sites == ("w", "y", "y2")
    assert_agree(model, sampler, (y[:5],))  # another batch shape: no rebuild needed
    assert potential.rebuilds == 1

    # the prior replaced by another object (another scale): that call takes log_prob, right
    # values; the new prior is learned for the next calls
    model.w = PyroSample(dist.Normal(torch.tensor(1.0, dtype=torch.float64), 3.0))
    assert_agree(model, sampler, (y,))
    assert potential.relearned == 1 and potential.forms["w"].fn is model._pyro_samples["w"]
    assert_agree(model, sampler, (y,))
    assert potential.relearned == 1

    model.extra = False
    assert_agree(model, sampler, (y,))
    assert potential.rebuilds == 2 and potential.sites == ("w", "y")


def chain(fast, model, batches, steps=40):
    sampler = SGHMC(fast=fast)
    sampler.setup(model, batches[0], num_data=50, num_warmup=30, seed=3)
    assert (sampler.potential is not None) == fast
    joints = [
        sampler.train_step(model, None, *batches[i % len(batches)]).log_joint for i in range(steps)
    ]
    return torch.cat([t.detach().reshape(-1) for t in sampler.theta]), torch.tensor(joints)


@pytest.mark.parametrize("which", ["regression", "bae"])
def test_chain_fast_and_traced_agree_to_rounding(which):
    """The same seed gives the same chain with the fast path on and off, to float tolerance
    (not bit for bit: the sums run in another order, a 1e-16 relative difference that the
    dynamics carry along without growing much in 40 steps; warm-up, adaptation windows and
    sampling steps included)."""
    if which == "bae":
        bae, x = small_bae()
        model = pvae.scale_to_data(bae.model, 50)
        batches = [(x[:10],), (x[10:20],)]
    else:
        x, y = regression_data()
        model = pvae.scale_to_data(regression, 50)
        batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 50, 10)]
    fast_state, fast_joint = chain(True, model, batches)
    slow_state, slow_joint = chain(False, model, batches)
    assert torch.allclose(fast_state, slow_state, rtol=1e-9, atol=1e-9)
    assert torch.allclose(fast_joint, slow_joint, rtol=1e-9)
    assert not torch.equal(fast_state, torch.zeros_like(fast_state))


def test_fast_argument_checked():
    with pytest.raises(TypeError, match="fast must be True or False"):
        SGHMC(fast="yes")  # type: ignore[arg-type]


def test_closed_form_refuses_other_distributions():
    shape = (3,)
    assert pvae.potential.closed_form(dist.Normal(0.0, 1.0).expand(shape).to_event(1), shape)
    assert (
        pvae.potential.closed_form(dist.Laplace(0.0, 1.0).expand(shape).to_event(1), shape) is None
    )
    loc = torch.zeros(3, requires_grad=True)  # a parameter that depends on another latent
    assert pvae.potential.closed_form(dist.Normal(loc, 1.0).to_event(1), shape) is None
    assert pvae.potential.closed_form(dist.Normal(0.0, 1.0).expand((2,)).to_event(1), shape) is None
    assert biject_to(dist.Normal(0.0, 1.0).support)  # real support: no transform


@pytest.mark.parametrize(
    "make, one_scale",
    [
        (lambda: dist.Normal(0.4, 2.0).expand([4, 3]).to_event(2), True),  # zero strides
        (lambda: dist.ExpandedDistribution(dist.Normal(0.0, 0.5), (4, 3)).to_event(1), True),
        (
            lambda: dist.Normal(torch.linspace(-1, 1, 3), torch.linspace(0.5, 2, 3)).expand([4, 3]),
            False,
        ),
    ],
)
def test_closed_form_matches_log_prob(make, one_scale):
    fn = make()  # built in float64 (the module's fixture)
    form = pvae.potential.closed_form(fn, (4, 3))
    # one scale broadcast is kept as one number (a dot product), not a tensor of 12 copies
    assert isinstance(form.half_precision, float) == one_scale
    value = torch.randn(4, 3).requires_grad_(True)
    fast = pvae.potential.normal_log_density(value, form)
    ref = fn.log_prob(value).sum()
    assert abs(float(fast - ref)) <= RTOL * abs(float(ref))
    (g,), (r,) = torch.autograd.grad(fast, [value]), torch.autograd.grad(ref, [value])
    assert float((g - r).abs().max()) <= RTOL * float(r.abs().max())


def test_normal_sum_matches_log_prob_and_refuses_the_rest():
    loc = torch.randn(4, 3).requires_grad_(True)
    value = torch.randn(4, 3).requires_grad_(True)
    cases = [
        dist.Normal(loc, 0.7),
        dist.Normal(loc, 0.7).to_event(2),
        dist.Normal(torch.tensor(0.3), 2.0).expand([4, 3]).to_event(1),
        torch.distributions.Normal(loc, torch.tensor(1.5)),
    ]
    for fn in cases:
        fast = pvae.potential.normal_sum(fn, value)
        ref = fn.log_prob(value).sum()
        assert abs(float(fast - ref)) <= RTOL * abs(float(ref))
        for g, r in zip(
            torch.autograd.grad(fast, [value, loc], allow_unused=True),
            torch.autograd.grad(ref, [value, loc], allow_unused=True),
            strict=True,
        ):
            assert (g is None) == (r is None)
            if g is not None:
                assert float((g - r).abs().max()) <= RTOL * float(r.abs().max())
    sigma = torch.tensor(0.5, requires_grad=True)
    assert pvae.potential.normal_sum(dist.Normal(loc, sigma), value) is None  # sigma is latent
    assert pvae.potential.normal_sum(dist.Normal(loc, torch.ones(4, 3)), value) is None
    assert pvae.potential.normal_sum(dist.Normal(0.0, 1.0), value) is None  # broadcast value
    assert pvae.potential.normal_sum(dist.StudentT(3.0, loc, 1.0), value) is None


def test_setup_check_sees_the_same_global_draws_and_leaves_the_streams():
    """A model drawing from numpy's global generator: the setup's check runs the traced and
    the fast log joint on the same draws (no spurious warning), and the streams after setup
    are those of a sampler without the fast path."""
    import warnings

    import numpy as np

    def jittery(y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        jitter = 0.1 * float(np.random.standard_normal())
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(w + jitter, 1.0), obs=y)

    y = torch.randn(6)
    after = []
    for fast in (True, False):
        np.random.seed(5)
        sampler = SGHMC(fast=fast)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            sampler.setup(jittery, (y,), seed=0)
        assert (sampler.potential is not None) == fast
        after.append(np.random.standard_normal())
    assert after[0] == after[1]
