"""The contract every model passes (as every GPyTorch kernel passes its base test case),
parametrised over every registered zoo model and hand-written Pyro pairs
(``contract_cases.CASES``): a family registered in :mod:`pvae.app.registry` gets these tests
without an edit here.

- ownership: two instances built alike in one process train independently, each its own
  tensors (a pair with fixed ``pyro.module`` names is refused instead, by name);
- names: two live instances register different parameter names;
- engines: every applicable engine trains (a better seeded bound, model and guide parameters
  moved) and does not at lr=0 (every parameter and the seeded bound bit-identical); a sampler
  pair's chain climbs from its initial state and lr=0 is refused;
- bound: every engine's reported bound lies below a many-particle ``log_likelihood`` estimate
  (which is an upper estimate of every engine's bound in expectation), up to 4 standard errors;
- resume: an interrupted and resumed run equals the uninterrupted one bit for bit;
- float64: a float64 pair trains (samples) in float64 and evaluates to finite float64 values;
- ``state_dict``: a new instance loaded from a trained one's state dict scores the same.

The command-line part (train or sample, then diagnose) is in ``test_contract_cli.py``.
"""

from __future__ import annotations

import copy
import math

import pyro
import pytest
import torch
from contract_cases import (
    CASES,
    Case,
    as_float64,
    has_kalman_guide,
    is_sampler_pair,
)
from engine_cases import ENGINES, STATE_SPACE_ENGINES
from pyro import poutine

import pvae
from pvae.inference import SGHMC
from pvae.protocol import param_split

ALL_ENGINES = {**ENGINES, **STATE_SPACE_ENGINES}
CASE_IDS = [case.name for case in CASES]
LR = 0.02
FAST_ENGINES = ("ELBO", "KalmanELBO")  # the others (multi-particle) are slow-marked


def case_engine_params() -> list:
    """Every (case, engine), the multi-particle engines slow-marked."""
    return [
        pytest.param(
            case,
            engine,
            id=f"{case.name}-{engine}",
            marks=() if engine in FAST_ENGINES else pytest.mark.slow,
        )
        for case in CASES
        for engine in ALL_ENGINES
    ]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: thread hand-offs cost more than they save
    yield
    torch.set_num_threads(threads)


# ---- helpers -----------------------------------------------------------------------------------


def fresh(case: Case) -> torch.nn.Module:
    """A new instance; a pair with fixed names first empties Pyro's store (as its user must)."""
    if not case.own_names:
        pyro.clear_param_store()
    return case.build()


def fit(pair, train, engine, lr=LR, epochs=2, **kwargs) -> pvae.Run:
    n = train[0].shape[0]
    kwargs = {"batch_size": max(1, n // 2), "seed": 0, "progress": False, **kwargs}
    return pvae.fit(pair.model, pair.guide, train, engine=engine, epochs=epochs, lr=lr, **kwargs)


def seeded_bound(pair, train, engine, seed: int = 123) -> float:
    """The engine's bound on ``train`` (nats per datapoint) with Pyro's and torch's generators
    seeded: two calls on the same parameters give the same number."""
    with torch.random.fork_rng(devices=[]):
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            return pvae.evaluate_bound(pair.model, pair.guide, train, engine, batch_size=10**6)


def snapshot(pair) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in pair.state_dict().items()}


def sampler_or_skip(case: Case, pair, train, sampler: bool) -> None:
    if is_sampler_pair(pair, train) != sampler:
        kind = "a sampler pair (global latents only)" if not sampler else "a variational pair"
        pytest.skip(f"{case.name} is {kind}")


def engine_or_skip(case: Case, pair, train, engine: str) -> None:
    sampler_or_skip(case, pair, train, sampler=False)
    if engine in STATE_SPACE_ENGINES and not has_kalman_guide(pair, train):
        pytest.skip(f"{engine} needs a guide site drawn from a KalmanSmoothedPosterior")


def sample(pair, train, sampler=None, **kwargs) -> pvae.Posterior:
    n = train[0].shape[0]
    options = {"num_samples": 3, "warmup": 6, "num_chains": 1, "batch_size": n}
    options.update(progress=False, seed=0, **kwargs)
    return pvae.sample(pair.model, train, sampler=sampler or SGHMC(lr=0.01), **options)


# ---- ownership and names -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_two_instances_train_their_own_parameters(case):
    train, _ = case.data()
    first = case.build()
    if not list(first.parameters()):
        pytest.skip(f"{case.name} has no parameters (its weights are latent sites)")
    if is_sampler_pair(first, train):
        pytest.skip(f"{case.name} is a sampler pair: nothing is trained")
    fit(first, train, ENGINES["ELBO"](), epochs=1)
    before = snapshot(first)

    second = case.build()
    if not case.own_names:  # fixed pyro.module names: refused, by name, while the store holds
        with pytest.raises(ValueError, match="is not the tensor its module holds"):
            fit(second, train, ENGINES["ELBO"](), epochs=1)
        pyro.clear_param_store()
        second = case.build()
    fresh_values = snapshot(second)
    model_params, guide_params = param_split(second.model, second.guide, train)
    own = {id(p) for p in second.parameters()}
    prefix = f"{getattr(second, '_pyro_name', None)}."
    for name, value in {**model_params, **guide_params}.items():
        # a module's tensor, or a store parameter under the instance's own (unique) name
        assert id(value) in own or name.startswith(prefix), f"{name} is not {case.name}'s own"
    fit(second, train, ENGINES["ELBO"](), epochs=1)

    moved = {n for n, p in second.state_dict().items() if not torch.equal(p, fresh_values[n])}
    assert moved, f"the second {case.name} did not train"
    if case.own_names:
        for name, value in first.state_dict().items():
            assert torch.equal(value, before[name]), f"the first {case.name}'s {name} changed"


def _param_names(pair, train, sampler: bool) -> set[str]:
    names = set()
    with poutine.block(), torch.random.fork_rng(devices=[]):
        if sampler:
            traces = [poutine.trace(pair.model).get_trace(*train)]
        else:
            guide = poutine.trace(pair.guide).get_trace(*train)
            model = poutine.trace(poutine.replay(pair.model, trace=guide)).get_trace(*train)
            traces = [guide, model]
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] == "param" or (sampler and site["type"] == "sample"):
                names.add(name)
    return names


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_two_live_instances_register_different_names(case):
    if not case.own_names:
        pytest.skip(f"{case.name} has fixed pyro.module names: refused, see the ownership test")
    train, _ = case.data()
    a, b = case.build(), case.build()
    sampler = is_sampler_pair(a, train)
    names_a, names_b = _param_names(a, train, sampler), _param_names(b, train, sampler)
    if sampler:  # its sites are sampled one model at a time: the module names must differ
        assert a._pyro_name != b._pyro_name
        return
    assert names_a and names_b, f"{case.name} registers no parameters"
    assert not names_a & names_b, f"shared names: {sorted(names_a & names_b)[:5]}"


# ---- every applicable engine trains, and does not at lr=0 --------------------------------------


@pytest.mark.parametrize(("case", "engine"), case_engine_params())
def test_every_engine_trains_and_not_at_lr_zero(case, engine):
    train, _ = case.data()
    pair = case.build()
    engine_or_skip(case, pair, train, engine)
    make = ALL_ENGINES[engine]
    start, bound = snapshot(pair), seeded_bound(pair, train, make())

    run = fit(pair, train, make(), lr=0.0, epochs=1)
    assert all(math.isfinite(step["bound"]) for step in run.steps)
    for name, value in pair.state_dict().items():
        assert torch.equal(value, start[name]), f"{name} moved at lr=0"
    assert seeded_bound(pair, train, make()) == bound

    before = split_snapshot(pair, train)
    run = fit(pair, train, make(), lr=LR, epochs=4)
    assert all(math.isfinite(step["bound"]) for step in run.steps)
    trained = seeded_bound(pair, train, make())
    # Common random numbers: the same draws score both parameter sets, so the noise of the
    # difference is far below the gain of 8 Adam steps from the initialisation.
    assert trained > bound, (bound, trained)
    after = split_snapshot(pair, train)
    for side in ("model", "guide"):
        if before[side]:
            moved = [n for n, p in before[side].items() if not torch.equal(p, after[side][n])]
            assert moved, f"no {side} parameter of {case.name} moved under {engine}"


def split_snapshot(pair, train) -> dict[str, dict[str, torch.Tensor]]:
    """The pair's parameters split by use (model / guide, read from the traces), copied."""
    model_params, guide_params = param_split(pair.model, pair.guide, train)
    return {
        "model": {n: p.detach().clone() for n, p in model_params.items()},
        "guide": {n: p.detach().clone() for n, p in guide_params.items()},
    }


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_sampler_pair_climbs_from_its_start_and_refuses_lr_zero(case):
    train, _ = case.data()
    pair = case.build()
    sampler_or_skip(case, pair, train, sampler=True)
    with pytest.raises(ValueError, match="lr"):
        SGHMC(lr=0.0)
    posterior = sample(pair, train, warmup=20)
    warmup = posterior.warmup_log_joint[0]
    assert bool(torch.isfinite(posterior.log_joint).all())
    # a chain started at a random state (init_radius) climbs: its late warm-up log joint is
    # above its first (a sign error in the gradient would make it fall)
    assert float(warmup[-5:].mean()) > float(warmup[:2].mean()), warmup
    first = next(iter(posterior.samples.values()))[0]
    assert not torch.equal(first[0], first[-1])  # the kept draws move


# ---- the bound lies below the log-likelihood ---------------------------------------------------

LL_SAMPLES, LL_REPEATS, BOUND_REPEATS = 400, 3, 6


@pytest.fixture(scope="module")
def trained_pairs():
    """Each variational case trained briefly with the ELBO, and its log-likelihood estimates
    (``LL_REPEATS`` independent means over the training rows, ``LL_SAMPLES`` particles each);
    built on first use and shared by the engines' tests."""
    cache: dict[str, tuple] = {}

    def get(case: Case):
        if case.name not in cache:
            train, _ = case.data()
            pair = fresh(case)
            if is_sampler_pair(pair, train):
                cache[case.name] = (pair, None)
            else:
                fit(pair, train, ENGINES["ELBO"](), epochs=4)
                lls = []
                for repeat in range(LL_REPEATS):
                    with torch.random.fork_rng(devices=[]):
                        pyro.set_rng_seed(1000 + repeat)
                        ll = pvae.log_likelihood(pair.model, pair.guide, train, LL_SAMPLES)
                    lls.append(float(ll.mean()))
                cache[case.name] = (pair, torch.tensor(lls, dtype=torch.float64))
        return cache[case.name]

    return get


@pytest.mark.parametrize(("case", "engine"), case_engine_params())
def test_reported_bound_is_below_the_log_likelihood(case, engine, trained_pairs):
    train, _ = case.data()
    pair, lls = trained_pairs(case)
    if lls is None:
        pytest.skip(f"{case.name} is a sampler pair: no per-datapoint log-likelihood")
    if not case.own_names:
        pyro.clear_param_store()  # the store was emptied between tests: the pair registers again
    engine_or_skip(case, pair, train, engine)
    bounds = torch.tensor(
        [seeded_bound(pair, train, ALL_ENGINES[engine](), seed=s) for s in range(BOUND_REPEATS)],
        dtype=torch.float64,
    )
    assert bool(torch.isfinite(bounds).all())
    # E[bound] <= E[IWAE_K] for every engine here (K = LL_SAMPLES particles from the same
    # guide) <= log p(x); the band is 4 standard errors of the difference of the two means.
    error = math.sqrt(bounds.var() / BOUND_REPEATS + lls.var() / LL_REPEATS)
    assert float(bounds.mean()) <= float(lls.mean()) + 4 * error + 1e-6, (bounds, lls)


# ---- resume, float64, state_dict ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_resume_is_bit_identical(case, tmp_path):
    """Two epochs in one go, and one epoch then a resume to two: the same parameters, step
    bounds and validation bounds, bit for bit. The resumed instance is first put back to its
    initial parameters (as a new process would build it), so everything after epoch 1 comes
    from the checkpoint, and torch's global generator is moved on in between (as another
    process's would be)."""
    train, valid = case.data()
    pair = fresh(case)
    if is_sampler_pair(pair, train):
        return _sampler_resume(pair, train, tmp_path)
    start = copy.deepcopy(pair.state_dict())

    def run(model, epochs, run_dir, resume=False):
        model.load_state_dict(start)
        return fit(
            model,
            train,
            ENGINES["IWAE"](),
            epochs=epochs,
            valid=valid,
            run_dir=run_dir,
            resume=resume,
            callbacks=case.callbacks(model),
        )

    whole_run = run(pair, 2, tmp_path / "whole")
    whole = copy.deepcopy(pair.state_dict())
    if not case.own_names:
        pyro.clear_param_store()
    resumed = case.build()
    run(resumed, 1, tmp_path / "part")
    torch.rand(100)  # another process's generator
    resumed_run = run(resumed, 2, tmp_path / "part", resume=True)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, whole[name]), name
    assert [s["bound"] for s in resumed_run.steps] == [s["bound"] for s in whole_run.steps]
    valid_bounds = [h["valid_bound"] for h in whole_run.history]
    assert [h["valid_bound"] for h in resumed_run.history] == valid_bounds


class _Interrupt(Exception):
    pass


class _InterruptedSGHMC(SGHMC):
    """Raises after ``stop_after`` steps, as a killed process would stop."""

    def __init__(self, stop_after: int, **kwargs):
        super().__init__(**kwargs)
        self.stop_after, self.taken = stop_after, 0

    def train_step(self, *args, **kwargs):
        if self.taken == self.stop_after:
            raise _Interrupt
        self.taken += 1
        return super().train_step(*args, **kwargs)


def _sampler_resume(pair, train, tmp_path) -> None:
    options = {"num_samples": 4, "warmup": 4, "checkpoint_every": 3}
    whole = sample(pair, train, _InterruptedSGHMC(10**9, lr=0.01), **options)
    with pytest.raises(_Interrupt):
        sample(pair, train, _InterruptedSGHMC(6, lr=0.01), run_dir=tmp_path, **options)
    resumed = sample(
        pair, train, _InterruptedSGHMC(10**9, lr=0.01), run_dir=tmp_path, resume=True, **options
    )
    for name, value in whole.samples.items():
        assert torch.equal(value, resumed.samples[name]), name
    assert torch.equal(whole.log_joint, resumed.log_joint)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float64_pair_trains_in_float64(case):
    train, _ = case.data()
    train = as_float64(train)
    pair = fresh(case).double()
    if is_sampler_pair(pair, train):
        posterior = sample(pair, train)
        for name, value in posterior.samples.items():
            assert value.dtype == torch.float64, name
        assert bool(torch.isfinite(posterior.log_joint).all())
        return
    run = fit(pair, train, ENGINES["IWAE"](), epochs=1)
    assert all(math.isfinite(step["bound"]) for step in run.steps)
    for name, value in pair.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float64, name
    for name, value in run.params.items():
        assert value.dtype == torch.float64, name
    ll = pvae.log_likelihood(pair.model, pair.guide, train, num_samples=4)
    assert ll.dtype == torch.float64 and bool(torch.isfinite(ll).all())


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            marks=pytest.mark.xfail(
                strict=True,
                reason="bug: ARDVAE keeps its prior variances only in Pyro's parameter store "
                "(pyro.param '<name>.prior_variance'), so state_dict() leaves out the values "
                "the prior callback re-estimated and a loaded copy scores differently",
            ),
        )
        if case.name == "ard"
        else case
        for case in CASES
    ],
    ids=CASE_IDS,
)
def test_state_dict_round_trip(case):
    train, _ = case.data()
    pair = fresh(case)
    sampler = is_sampler_pair(pair, train)
    if not sampler:
        fit(pair, train, ENGINES["ELBO"](), epochs=2, callbacks=case.callbacks(pair))
    state = copy.deepcopy(pair.state_dict())
    if not case.own_names:
        pyro.clear_param_store()
    other = case.build()
    other.load_state_dict(state)
    for name, value in other.state_dict().items():
        assert torch.equal(value, state[name]), name

    def seeded_log_joint(model) -> float:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            pyro.set_rng_seed(7)
            return float(poutine.trace(model.model).get_trace(*train).log_prob_sum())

    if sampler:
        assert seeded_log_joint(other) == seeded_log_joint(pair)
        return
    if not case.own_names:  # one of the two at a time in Pyro's store
        pyro.clear_param_store()
        first = seeded_bound(pair, train, ENGINES["ELBO"]())
        pyro.clear_param_store()
        assert seeded_bound(other, train, ENGINES["ELBO"]()) == first
        return
    assert seeded_bound(other, train, ENGINES["ELBO"]()) == seeded_bound(
        pair, train, ENGINES["ELBO"]()
    )
