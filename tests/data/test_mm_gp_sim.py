"""mm-gp-sim: shapes, determinism, the generating story (rates, images, missing modalities)."""

from __future__ import annotations

import math

import pytest
import torch

from pvae import data
from pvae.data import MultimodalSequenceSplit, MultimodalSequenceSplits


@pytest.fixture(scope="module")
def ds():
    return data.load("mm-gp-sim", sizes=(60, 10, 20), num_steps=30, missing=0.5, seed=3)


def test_layout_and_truth(ds):
    assert isinstance(ds, MultimodalSequenceSplits)
    counts, frames, times, mask = ds.train
    assert isinstance(ds.train, MultimodalSequenceSplit)
    assert counts.shape == (60, 30, 20) and frames.shape == (60, 30, 1, 8, 8)
    assert times.shape == (60, 30) and mask.shape == (60, 2) and mask.dtype == torch.bool
    assert torch.equal(times[0], torch.arange(30.0))
    assert torch.equal(counts, counts.round()) and counts.min() >= 0
    assert frames.min() >= 0 and frames.max() <= 1
    truth = ds.truth["train"]
    for group in ("shared", "neural", "image"):
        assert truth[group].shape == (60, 30, 1)
    # rates are exp(C [z_s, z_n] + d) with the stored loading and offset
    z = torch.cat([truth["shared"], truth["neural"]], -1)
    rates = torch.exp(z @ ds.info["loading"].T + ds.info["offset"])
    torch.testing.assert_close(truth["rates"], rates, rtol=1e-4, atol=1e-4)
    # missing modalities: never both, about missing/2 each, values zeroed
    assert mask.any(1).all()
    assert 0.1 < (~mask[:, 0]).float().mean() < 0.45 and 0.1 < (~mask[:, 1]).float().mean() < 0.45
    assert counts[~mask[:, 0]].abs().sum() == 0 and frames[~mask[:, 1]].abs().sum() == 0
    torch.testing.assert_close(frames[mask[:, 1]], truth["frames"][mask[:, 1]])


def test_latent_paths_are_unit_rbf_gps():
    ds = data.load("mm-gp-sim", sizes=(400, 0, 0), num_steps=20, lengthscale=4.0, seed=0)
    z = ds.truth["train"]["shared"][..., 0]  # (400, 20)
    empirical = z.T.double().cov()
    t = torch.arange(20.0, dtype=torch.float64)
    kernel = torch.exp(-((t[:, None] - t) ** 2) / (2 * 16.0))
    # 400 draws: entries have sd ~ sqrt(2 / 400) ~ 0.07; 0.25 is > 3 sd
    assert (empirical - kernel).abs().max() < 0.25


def test_the_digit_turns_with_the_shared_latent_and_scales_with_the_image_latent():
    still = data.load("mm-gp-sim", sizes=(3, 0, 0), angle_scale=0.0, scale_amount=0.0, seed=0)
    frames = still.truth["train"]["frames"]
    assert torch.allclose(frames, frames[:1, :1].expand_as(frames), atol=1e-6)
    turning = data.load("mm-gp-sim", sizes=(3, 0, 0), scale_amount=0.0, seed=0)
    assert not torch.allclose(turning.truth["train"]["frames"], frames, atol=1e-3)
    assert turning.info["angle_scale"] == pytest.approx(math.pi / 4)


def test_deterministic_and_bad_options():
    a = data.load("mm-gp-sim", sizes=(5, 1, 1), num_steps=10, seed=1)
    b = data.load("mm-gp-sim", sizes=(5, 1, 1), num_steps=10, seed=1)
    for x, y in zip(a.train, b.train, strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="digit"):
        data.load("mm-gp-sim", sizes=(5, 1, 1), digit=11)
    with pytest.raises(ValueError, match="missing"):
        data.load("mm-gp-sim", sizes=(5, 1, 1), missing=1.5)
    with pytest.raises(ValueError, match="lengthscale"):
        data.load("mm-gp-sim", sizes=(5, 1, 1), lengthscale=-1.0)
