"""The ``hmnist-like`` set: shapes, the per-entry mask, the clean frames, determinism, the
imputation helpers and bad options."""

import pytest
import torch

from pvae import data
from pvae.data.gp_sets import imputation_mse, mean_pixel_baseline, with_entry_mask


@pytest.fixture(scope="module")
def ds():
    return data.load("hmnist-like", sizes=(20, 5, 10), missing=0.2, seed=3)


def test_shapes_masks_and_zeros(ds):
    values, times, mask = ds.train
    assert values.shape == (20, 10, 1, 8, 8) and times.shape == (20, 10)
    assert ds.likelihood == "continuous_bernoulli"
    assert (mask.sum(1) == 8).all()  # round(0.2 * 10) frames hidden per sequence
    observed = ds.truth["train"]["observed"]
    assert observed.dtype == torch.bool and observed.shape == values.shape
    assert not (observed & ~mask[:, :, None, None, None]).any()
    assert (values[~observed] == 0).all()
    frames = ds.truth["train"]["frames"]
    assert torch.equal(values[observed], frames[observed])
    # about 60% of the pixels of observed frames are hidden (binomial, 5,120 pixels: sd 0.007)
    kept = observed.sum() / (mask.sum() * 64)
    assert abs(float(kept) - 0.4) < 0.03
    assert "hmnist-like" in [info.name for info in data.available()]


def test_deterministic_and_seeded():
    a = data.load("hmnist-like", sizes=(4, 1, 2), seed=1)
    b = data.load("hmnist-like", sizes=(4, 1, 2), seed=1)
    c = data.load("hmnist-like", sizes=(4, 1, 2), seed=2)
    assert torch.equal(a.train.values, b.train.values)
    assert torch.equal(a.truth["train"]["observed"], b.truth["train"]["observed"])
    assert not torch.equal(a.train.values, c.train.values)


def test_with_entry_mask_and_imputation_scores(ds):
    values, times, mask, observed = with_entry_mask(ds, "test")
    assert torch.equal(observed, ds.truth["test"]["observed"])
    frames = ds.truth["test"]["frames"]
    assert imputation_mse(frames, ds, "test") == 0.0
    missing = ~observed
    expected = float(frames[missing].pow(2).mean())
    assert imputation_mse(values, ds, "test") == pytest.approx(expected)
    baseline = mean_pixel_baseline(ds, "test")
    assert torch.equal(baseline[observed], values[observed])
    assert imputation_mse(baseline, ds, "test") < expected


def test_bad_options_and_inputs(ds):
    with pytest.raises(ValueError, match="missing_pixels"):
        data.load("hmnist-like", sizes=(2, 1, 1), missing_pixels=1.0)
    with pytest.raises(ValueError, match="source"):
        data.load("hmnist-like", sizes=(2, 1, 1), source="cifar")
    with pytest.raises(ValueError, match="no per-entry mask"):
        with_entry_mask(data.load("rotating-digits", sizes=(2, 1, 1)), "train")
    with pytest.raises(ValueError, match="split"):
        with_entry_mask(ds, "dev")
    with pytest.raises(ValueError, match="imputed"):
        imputation_mse(torch.zeros(3), ds, "test")
