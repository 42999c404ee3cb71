"""What ``pvae.sample``'s loop did, recorded and compared with what it should have done: which
states thinning keeps, whether chains get distinct random numbers, and whether a resume restores
every random-number stream a model may draw from (Pyro's, torch's global one, NumPy's global
one and Python's)."""

from __future__ import annotations

import random

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae
from pvae.inference import SGHMC


def regression(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def data(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return x, x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(n, generator=g)


OPTIONS = dict(warmup=6, num_chains=2, batch_size=10, progress=False, seed=3)


def test_thin_k_keeps_every_kth_state_of_thin_1():
    thin, kept = 3, 4
    every = pvae.sample(regression, data(), num_samples=thin * kept, thin=1, **OPTIONS)
    thinned = pvae.sample(regression, data(), num_samples=kept, thin=thin, **OPTIONS)
    # a chain takes warmup + num_samples * thin steps and keeps the last state of each block
    for name in every.samples:
        assert torch.equal(thinned.samples[name], every.samples[name][:, thin - 1 :: thin]), name
    assert torch.equal(thinned.log_joint, every.log_joint[:, thin - 1 :: thin])
    assert torch.equal(thinned.warmup_log_joint, every.warmup_log_joint)


def prior_only():
    pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))


def test_chains_of_a_model_without_data_differ():
    post = pvae.sample(prior_only, None, num_samples=20, warmup=5, num_chains=3, progress=False)
    w = post.samples["w"]
    assert w.shape == (3, 20, 3)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(w[a], w[b]), (a, b)
    again = pvae.sample(prior_only, None, num_samples=20, warmup=5, num_chains=3, progress=False)
    assert torch.equal(again.samples["w"], w)


def noisy_regression(x, y=None):
    """A model that draws from every global stream at every step (as dropout, data
    augmentation or a hand-written noise term would): a resume must restore all of them."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    jitter = (
        0.01 * torch.randn(())
        + 0.01 * float(np.random.standard_normal())
        + 0.01 * random.gauss(0.0, 1.0)
    )
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w + jitter, 0.5), obs=y)


class Interrupt(Exception):
    pass


class InterruptedSGHMC(SGHMC):
    def __init__(self, stop_after: int, **kwargs):
        super().__init__(**kwargs)
        self.stop_after, self.taken = stop_after, 0

    def train_step(self, model, guide=None, *args, **kwargs):
        if self.taken == self.stop_after:
            raise Interrupt
        self.taken += 1
        return super().train_step(model, guide, *args, **kwargs)


@pytest.mark.parametrize("stop_after", [9, 25])  # inside chain 0, inside chain 1
def test_resume_restores_every_global_random_stream(tmp_path, stop_after):
    options = {**OPTIONS, "num_samples": 8, "thin": 1, "checkpoint_every": 4}
    whole = pvae.sample(noisy_regression, data(), sampler=InterruptedSGHMC(10**9), **options)
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        pvae.sample(
            noisy_regression,
            data(),
            sampler=InterruptedSGHMC(stop_after),
            run_dir=run_dir,
            **options,
        )
    # the interrupted process goes on drawing before the resume: nothing it leaves may leak in
    torch.randn(5), np.random.standard_normal(5), random.random()
    resumed = pvae.sample(
        noisy_regression,
        data(),
        sampler=InterruptedSGHMC(10**9),
        run_dir=run_dir,
        resume=True,
        **options,
    )
    assert torch.equal(whole.samples["w"], resumed.samples["w"])
    assert torch.equal(whole.log_joint, resumed.log_joint)
