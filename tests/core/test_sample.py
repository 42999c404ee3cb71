"""``pvae.sample``'s loop: thinning and shapes, exact resume, run folders, argument checks, and
the ``Posterior``'s ArviZ export, summary and predictive."""

from __future__ import annotations

import signal

import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae
from pvae.inference import SGHMC


def regression(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 0.3))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, s), obs=y)


def data(n=60):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return x, x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(n, generator=g)


OPTIONS = dict(num_samples=6, warmup=5, thin=2, num_chains=2, batch_size=16, progress=False)


def test_shapes_and_thinning():
    post = pvae.sample(regression, data(), **OPTIONS)
    assert post.samples["w"].shape == (2, 6, 2)
    assert post.samples["s"].shape == (2, 6)
    assert post.log_joint.shape == (2, 6)
    assert post.warmup_log_joint.shape == (2, 5)
    assert bool(torch.isfinite(post.log_joint).all())
    assert not torch.equal(post.samples["w"][0], post.samples["w"][1])  # chains differ
    assert post.samples["w"].device.type == "cpu"


def test_same_seed_same_samples():
    a = pvae.sample(regression, data(), **OPTIONS)
    b = pvae.sample(regression, data(), **OPTIONS)
    assert torch.equal(a.samples["w"], b.samples["w"])


class Interrupt(Exception):
    pass


class InterruptedSGHMC(SGHMC):
    """Raises after ``stop_after`` steps, as a killed process would stop."""

    def __init__(self, stop_after, **kwargs):
        super().__init__(**kwargs)
        self.stop_after, self.taken = stop_after, 0

    def train_step(self, model, guide=None, *args, **kwargs):
        if self.taken == self.stop_after:
            raise Interrupt
        self.taken += 1
        return super().train_step(model, guide, *args, **kwargs)


@pytest.mark.parametrize("stop_after", [9, 21])  # inside chain 0, inside chain 1
def test_resume_is_bit_identical(tmp_path, stop_after):
    options = {**OPTIONS, "checkpoint_every": 4}
    whole = pvae.sample(regression, data(), sampler=InterruptedSGHMC(10**9), **options)
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        pvae.sample(
            regression, data(), sampler=InterruptedSGHMC(stop_after), run_dir=run_dir, **options
        )
    resumed = pvae.sample(
        regression,
        data(),
        sampler=InterruptedSGHMC(10**9),
        run_dir=run_dir,
        resume=True,
        **options,
    )
    for name in whole.samples:
        assert torch.equal(whole.samples[name], resumed.samples[name]), name
    assert torch.equal(whole.log_joint, resumed.log_joint)
    # a finished run resumes to the same posterior without a step
    again = pvae.sample(
        regression, data(), sampler=InterruptedSGHMC(0), run_dir=run_dir, resume=True, **options
    )
    assert torch.equal(again.samples["w"], whole.samples["w"])


class SigintSGHMC(SGHMC):
    """Sends itself SIGINT (as Ctrl-C does) during its step number ``at`` (0-based, counted
    over chains), ``times`` times."""

    def __init__(self, at, times=1, **kwargs):
        super().__init__(**kwargs)
        self.at, self.times, self.taken = at, times, 0

    def train_step(self, model, guide=None, *args, **kwargs):
        if self.taken == self.at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)
        self.taken += 1
        return super().train_step(model, guide, *args, **kwargs)


# A chain takes 5 + 6 * 2 = 17 steps: inside chain 0, its last step (the checkpoint between
# chains), inside chain 1.
@pytest.mark.parametrize("at, chain, step", [(6, 0, 7), (16, 1, 0), (20, 1, 4)])
def test_sigint_writes_a_checkpoint_and_resume_is_bit_identical(tmp_path, at, chain, step):
    options = {**OPTIONS, "checkpoint_every": 1000}  # no periodic checkpoint within a chain
    whole = pvae.sample(regression, data(), sampler=SigintSGHMC(10**9), **options)
    run_dir = tmp_path / "run"
    with pytest.raises(pvae.SamplingInterrupted) as stopped:
        pvae.sample(regression, data(), sampler=SigintSGHMC(at), run_dir=run_dir, **options)
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert (stopped.value.chain, stopped.value.step) == (chain, step)
    assert stopped.value.checkpoint == str(run_dir / "checkpoint.pt")
    assert "resume=True" in str(stopped.value)
    saved = pvae.load_checkpoint(run_dir / "checkpoint.pt")
    assert (saved["chain"], saved["step"]) == (chain, step)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    never = SigintSGHMC(10**9)
    resumed = pvae.sample(regression, data(), never, run_dir=run_dir, resume=True, **options)
    for name in whole.samples:
        assert torch.equal(whole.samples[name], resumed.samples[name]), name
    assert torch.equal(whole.log_joint, resumed.log_joint)
    assert torch.equal(whole.warmup_log_joint, resumed.warmup_log_joint)


def test_a_checkpoint_between_chains(tmp_path):
    """Stopped in chain 1 with no periodic checkpoint due, the run still resumes from the
    checkpoint written when chain 0 ended (and bit-identically)."""
    options = {**OPTIONS, "checkpoint_every": 1000}
    whole = pvae.sample(regression, data(), sampler=InterruptedSGHMC(10**9), **options)
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        pvae.sample(regression, data(), sampler=InterruptedSGHMC(20), run_dir=run_dir, **options)
    saved = pvae.load_checkpoint(run_dir / "checkpoint.pt")
    assert (saved["chain"], saved["step"]) == (1, 0) and saved["engine"] == {}
    resumed = pvae.sample(
        regression, data(), InterruptedSGHMC(10**9), run_dir=run_dir, resume=True, **options
    )
    assert torch.equal(whole.samples["w"], resumed.samples["w"])


def test_a_second_sigint_stops_at_once_and_no_run_dir_saves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt) as stopped:  # twice: no step is finished
        pvae.sample(regression, data(), sampler=SigintSGHMC(3, times=2), run_dir=tmp_path / "r")
    assert not isinstance(stopped.value, pvae.SamplingInterrupted)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    with pytest.raises(pvae.SamplingInterrupted, match="nothing was saved") as stopped:
        pvae.sample(regression, data(), sampler=SigintSGHMC(3), **OPTIONS)
    assert stopped.value.checkpoint is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_run_dir_refused_without_resume_and_settings_compared(tmp_path):
    pvae.sample(regression, data(), run_dir=tmp_path, **OPTIONS)
    with pytest.raises(ValueError, match="resume=True"):
        pvae.sample(regression, data(), run_dir=tmp_path, **OPTIONS)
    with pytest.raises(ValueError, match="thin"):
        pvae.sample(regression, data(), run_dir=tmp_path, resume=True, **{**OPTIONS, "thin": 3})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"warmup": -1}, ValueError, "warmup"),
        ({"thin": 1.5}, ValueError, "thin"),
        ({"num_chains": True}, TypeError, "num_chains"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"sampler": "sghmc"}, TypeError, "sampler"),
        ({"sampler": pyro.infer.Trace_ELBO()}, TypeError, "sampler"),
        ({"resume": 1}, TypeError, "resume"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pvae.sample(regression, data(), **{**OPTIONS, **kwargs})


def test_bad_data():
    x, y = data()
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        pvae.sample(regression, (x, y), **OPTIONS)


def test_arviz_summary_and_predictive():
    post = pvae.sample(regression, data(), **OPTIONS)
    idata = post.to_arviz()
    assert idata.posterior["w"].shape == (2, 6, 2)
    assert idata.sample_stats["lp"].shape == (2, 6)
    summary = post.summary()
    assert "r_hat" in summary.columns and len(summary) == 3  # w[0], w[1], s
    assert post.rhat()["w"].shape == (2,) and post.ess()["s"].shape == ()
    x, _ = data()
    predictive = post.predictive(regression, x[:5])
    assert predictive["y"].shape == (12, 5)
    assert post.predictive(regression, x[:5], num_samples=4)["y"].shape == (4, 5)
    with pytest.raises(ValueError, match="num_samples"):
        post.predictive(regression, x[:5], num_samples=13)
