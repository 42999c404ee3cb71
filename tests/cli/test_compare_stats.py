"""The statistics behind ``pvae compare``'s table, checked on numbers small enough to compute
by hand: the paired Δ and its standard error (not its standard deviation), and the yardstick
(its estimator, its K and its seed, and the training's random numbers left untouched)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import pvae
from pvae.app import compare
from pvae.inference import ELBO, IWAE
from pvae.models import VAE


def test_paired_delta_and_its_standard_error():
    # per-point log p(x) of two bounds on the same 4 test points, seed 0 and seed 1
    ref0, ref1 = torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([-1.5, -2.5, -3.5, -4.5])
    diff0 = torch.tensor([0.5, 1.0, 0.0, 1.5])
    per_point = {("elbo", 0): ref0, ("iwae", 0): ref0 + diff0, ("elbo", 1): ref1}
    per_point = {key: value.tolist() for key, value in per_point.items()}
    per_point[("iwae", 1)] = []  # failed: no per-point values
    results = [
        compare.BoundResult(bound, seed, bound, bound)
        for bound, seed in (("elbo", 0), ("iwae", 0), ("elbo", 1), ("iwae", 1))
    ]
    compare.add_deltas(results, per_point)
    assert [r.reference for r in results] == ["elbo"] * 4
    assert results[0].delta_log_likelihood == 0.0 and results[0].delta_stderr == 0.0
    assert results[1].delta_log_likelihood == pytest.approx(0.75)
    # the standard error of the mean of 4 paired differences: sd / sqrt(4)
    sd = math.sqrt(sum((d - 0.75) ** 2 for d in (0.5, 1.0, 0.0, 1.5)) / 3)
    assert results[1].delta_stderr == pytest.approx(sd / 2)
    assert math.isnan(results[3].delta_log_likelihood)


@pytest.mark.parametrize("name,samples", [("iwae", 7), ("elbo", 3)])
def test_yardstick_uses_its_estimator_k_and_seed_and_leaves_training_rng(name, samples):
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(x_dim=6, z_dim=2, hidden=(8,), likelihood="bernoulli")
    valid = (torch.rand(12, 6) > 0.5).float()
    callback = compare._yardstick_callback(vae, valid, (name, samples), 123, torch.device("cpu"))
    torch.manual_seed(99)
    before = torch.get_rng_state()
    record: dict = {}
    callback(None, record)
    assert torch.equal(torch.get_rng_state(), before)  # the training's stream is untouched
    assert callback.seconds > 0
    engine = IWAE(samples) if name == "iwae" else ELBO(samples)
    torch.manual_seed(123)
    with torch.no_grad():
        expected = float(
            pvae.evaluate_bound(vae.model, vae.guide, valid, engine, compare.EVAL_BATCH)
        )
    assert record["yardstick"] == expected  # same estimator, same K, same seed: same number
    torch.manual_seed(124)
    with torch.no_grad():
        other_seed = float(
            pvae.evaluate_bound(vae.model, vae.guide, valid, engine, compare.EVAL_BATCH)
        )
    assert other_seed != expected
    other_k = IWAE(samples + 1) if name == "iwae" else ELBO(samples + 1)
    torch.manual_seed(123)
    with torch.no_grad():
        assert (
            float(pvae.evaluate_bound(vae.model, vae.guide, valid, other_k, compare.EVAL_BATCH))
            != expected
        )
