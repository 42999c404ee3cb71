"""Tests for the sequence containers and sets of pvae.data: SequenceSplits validation, the
(values, times, mask) pair protocol, pendulum and rotating-digits."""

import dataclasses
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.integrate
import torch

import pvae
from pvae import data
from pvae.data.sequences import _pendulum_path, _rotate_images

SMALL = (6, 3, 3)


def toy_split(n=4, steps=5, event=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, steps, *event, generator=g)
    times = torch.arange(steps, dtype=torch.float32).expand(n, steps).clone()
    mask = torch.rand(n, steps, generator=g) > 0.3
    return data.SequenceSplit(values, times, mask)


def toy_splits(train=None, valid=None, test=None, **kwargs):
    return data.SequenceSplits(
        name="toy",
        train=train if train is not None else toy_split(),
        valid=valid if valid is not None else toy_split(n=2, seed=1),
        test=test if test is not None else toy_split(n=3, seed=2),
        likelihood="gaussian",
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# SequenceSplits
# ---------------------------------------------------------------------------------------------


def test_sequence_splits_derive_shapes():
    ds = toy_splits(truth={"train": {"states": torch.zeros(4, 5, 3)}})
    assert ds.event_shape == (2,) and ds.num_steps == 5 and ds.x_dim == 2
    assert ds.image_shape is None
    masks = [ds.train.mask, ds.valid.mask, ds.test.mask]
    expected = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert ds.observed_fraction == pytest.approx(expected)
    images = toy_splits(
        train=toy_split(event=(1, 4, 4)),
        valid=toy_split(n=1, event=(1, 4, 4)),
        test=toy_split(n=1, event=(1, 4, 4)),
    )
    assert images.image_shape == (1, 4, 4) and images.x_dim == 16
    # a split is a tuple: unpacks into the pair's positional arguments
    values, times, mask = images.train
    assert values.shape == (4, 5, 1, 4, 4) and times.shape == mask.shape == (4, 5)
    # replace re-validates and re-derives
    shorter = dataclasses.replace(images, train=toy_split(n=2, event=(1, 4, 4)))
    assert shorter.x_dim == 16 and len(shorter.train.values) == 2
    assert "num_steps=5" in repr(images) and "event_shape=(1, 4, 4)" in repr(images)


def test_unobserved_steps_may_hold_nan():
    split = toy_split()
    values = split.values.clone()
    values[~split.mask] = float("nan")
    ds = toy_splits(train=data.SequenceSplit(values, split.times, split.mask))
    assert torch.isnan(ds.train.values).any()


def _broken(kind):
    values, times, mask = toy_split()
    if kind == "values-1d":
        return data.SequenceSplit(values[:, 0, 0], times, mask)
    if kind == "values-int":
        return data.SequenceSplit(values.long(), times, mask)
    if kind == "times-shape":
        return data.SequenceSplit(values, times[:, :4], mask)
    if kind == "mask-shape":
        return data.SequenceSplit(values, times, mask[:3])
    if kind == "mask-float":
        return data.SequenceSplit(values, times, mask.float())
    if kind == "nan-observed":
        values = values.clone()
        values[0, int(mask[0].nonzero()[0]), 0] = float("nan")
        return data.SequenceSplit(values, times, mask)
    if kind == "times-nan":
        times = times.clone()
        times[1, 2] = float("nan")
        return data.SequenceSplit(values, times, mask)
    if kind == "times-not-increasing":
        times = times.clone()
        times[1, 3] = times[1, 2]
        return data.SequenceSplit(values, times, mask)
    if kind == "plain-tuple":
        return (values, times, mask)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("values-1d", ValueError, r"values must be a floating tensor \(N, T, \*event_shape\)"),
        ("values-int", ValueError, "values must be a floating tensor.*torch.int64"),
        ("times-shape", ValueError, r"times must have shape \(N, T\) = \(4, 5\).*got \(4, 4\)"),
        ("mask-shape", ValueError, r"mask must have shape \(N, T\) = \(4, 5\).*got \(3, 5\)"),
        ("mask-float", ValueError, "mask must be a bool tensor.*torch.float32"),
        ("nan-observed", ValueError, r"values hold 1 NaN/inf value\(s\) at observed steps"),
        ("times-nan", ValueError, "times hold 1 NaN/inf"),
        (
            "times-not-increasing",
            ValueError,
            r"strictly increasing.*sequence 1 has times\[3\] = 2 <= times\[2\] = 2",
        ),
        ("plain-tuple", TypeError, r"must be a SequenceSplit\(values, times, mask\), got tuple"),
    ],
)
def test_sequence_splits_reject_bad_splits_naming_the_split(kind, error, message):
    with pytest.raises(error, match=f"SequenceSplits 'toy': the valid split.*{message}"):
        toy_splits(valid=_broken(kind))


def test_sequence_splits_must_agree_and_truth_must_match():
    with pytest.raises(ValueError, match="the test split has steps x event shape .* share T"):
        toy_splits(test=toy_split(steps=6))
    with pytest.raises(ValueError, match="the test split has steps x event shape"):
        toy_splits(test=toy_split(event=(3,)))
    with pytest.raises(ValueError, match=r"truth\['valid'\]\['angles'\] must be a tensor with 2"):
        toy_splits(truth={"valid": {"angles": torch.zeros(3, 5)}})
    with pytest.raises(ValueError, match="truth keys must be split names"):
        toy_splits(truth={"training": {}})


def test_a_sequence_split_trains_a_pair_as_positional_arguments():
    ds = data.load("pendulum", sizes=(8, 2, 2), num_steps=6, missing=0.5, seed=0)
    seen = []

    def model(values, times, mask):
        seen.append((values.shape, times.shape, mask.shape))
        n = values.shape[0]
        loc = pyro.param("loc", torch.zeros(1))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            frames = (z[:, None, None, None, None] + loc).expand(values.shape)
            pyro.sample(
                "x",
                dist.Normal(frames, 1.0).to_event(3).mask(mask).to_event(1),
                obs=values,
            )

    def guide(values, times, mask):
        with pyro.plate("data", values.shape[0]):
            pyro.sample("z", dist.Normal(values.mean((1, 2, 3, 4)), 1.0))

    pyro.clear_param_store()
    pvae.fit(model, guide, ds.train, epochs=1, batch_size=4, progress=False)
    # minibatches of sequences: every argument cut along the same first dimension
    assert ((4, 6, 1, 16, 16), (4, 6), (4, 6)) in seen
    assert all(v[1:] == (6, 1, 16, 16) and t == m == v[:2] for v, t, m in seen)


# ---------------------------------------------------------------------------------------------
# Pendulum
# ---------------------------------------------------------------------------------------------


def test_pendulum_shapes_ranges_and_determinism():
    ds = data.load("pendulum", sizes=SMALL, num_steps=12, seed=3)
    assert isinstance(ds, data.SequenceSplits) and ds.likelihood == "continuous_bernoulli"
    assert ds.event_shape == (1, 16, 16) and ds.num_steps == 12 and ds.image_shape == (1, 16, 16)
    for split, n in zip(("train", "valid", "test"), SMALL, strict=True):
        values, times, mask = getattr(ds, split)
        assert values.shape == (n, 12, 1, 16, 16) and values.dtype == torch.float32
        assert mask.all() and values.min() >= 0 and values.max() <= 1
        assert torch.allclose(times, 0.1 * torch.arange(12.0).expand(n, 12))
        truth = ds.truth[split]
        assert truth["angles"].shape == truth["angular_velocity"].shape == (n, 12)
        assert torch.equal(truth["frames"], values)  # no noise, nothing missing
    again = data.load("pendulum", sizes=SMALL, num_steps=12, seed=3)
    other = data.load("pendulum", sizes=SMALL, num_steps=12, seed=4)
    assert torch.equal(ds.train.values, again.train.values)
    assert torch.equal(ds.truth["test"]["angles"], again.truth["test"]["angles"])
    assert not torch.equal(ds.train.values, other.train.values)
    # the splits come from independent streams: the test set does not depend on the train size
    bigger = data.load("pendulum", sizes=(9, 3, 3), num_steps=12, seed=3)
    assert torch.equal(bigger.test.values, ds.test.values)
    assert ds.info["seed"] == 3 and "description" in ds.info


def test_pendulum_bob_follows_the_true_angle():
    # The bob is a Gaussian of width 1 px whose centre is at distance 5.6 px from the frame's
    # centre; the frame's centre of mass sits at the bob's centre up to the cut tails (< 0.05 px),
    # so its angle about the centre matches theta to about 0.01 rad.
    ds = data.load("pendulum", sizes=(20, 0, 0), num_steps=30, max_angle=3.0, seed=0)
    frames = ds.truth["train"]["frames"][:, :, 0].double()
    angles = ds.truth["train"]["angles"].double()
    grid = torch.arange(16, dtype=torch.float64) - 7.5
    mass = frames.sum((-2, -1))
    row = (frames.sum(-1) * grid).sum(-1) / mass
    col = (frames.sum(-2) * grid).sum(-1) / mass
    assert torch.allclose(row, 5.6 * torch.cos(angles), atol=0.05)
    assert torch.allclose(col, 5.6 * torch.sin(angles), atol=0.05)
    recovered = torch.atan2(col, row)
    wrapped = torch.remainder(recovered - angles + math.pi, 2 * math.pi) - math.pi
    assert wrapped.abs().max() < 0.01
    assert angles.abs().max() > 1.5  # the check covers wide swings


def test_pendulum_undamped_energy_is_conserved_and_damping_dissipates():
    # E = omega^2 / 2 - (g / l) cos(theta) is an exact invariant without damping; RK4 with 20
    # substeps of 5 ms keeps it to ~1e-8, and the float32 truth to ~1e-6.
    ds = data.load("pendulum", sizes=(10, 0, 0), num_steps=60, seed=1)
    theta = ds.truth["train"]["angles"].double()
    omega = ds.truth["train"]["angular_velocity"].double()
    energy = omega**2 / 2 - 9.81 * torch.cos(theta)
    assert torch.allclose(energy, energy[:, :1].expand_as(energy), rtol=0, atol=1e-5)
    damped = data.load("pendulum", sizes=(10, 0, 0), num_steps=60, damping=0.5, seed=1)
    theta = damped.truth["train"]["angles"].double()
    omega = damped.truth["train"]["angular_velocity"].double()
    energy = omega**2 / 2 - 9.81 * torch.cos(theta)
    assert (energy[:, 1:] < energy[:, :-1]).all()


@pytest.mark.parametrize("damping", [0.0, 0.7])
def test_pendulum_path_matches_a_reference_ode_solver_on_irregular_grids(damping):
    rng = np.random.default_rng(0)
    theta0, omega0 = rng.uniform(-1.5, 1.5, 3), rng.uniform(-1.5, 1.5, 3)
    gaps = rng.uniform(0.05, 0.15, (3, 24))
    times = np.concatenate([np.zeros((3, 1)), np.cumsum(gaps, 1)], 1)
    theta, omega = _pendulum_path(theta0, omega0, times, 9.81, 1.0, damping)
    for i in range(3):
        solution = scipy.integrate.solve_ivp(
            lambda t, s: [s[1], -9.81 * np.sin(s[0]) - damping * s[1]],
            (0.0, times[i, -1]),
            [theta0[i], omega0[i]],
            method="DOP853",
            t_eval=times[i],
            rtol=1e-12,
            atol=1e-12,
        )
        np.testing.assert_allclose(theta[i], solution.y[0], atol=1e-7)
        np.testing.assert_allclose(omega[i], solution.y[1], atol=1e-7)


def test_pendulum_missing_frames_noise_and_irregular_times():
    ds = data.load(
        "pendulum", sizes=SMALL, num_steps=20, missing=0.3, noise=0.1, irregular=True, seed=0
    )
    for split in ("train", "valid", "test"):
        values, times, mask = getattr(ds, split)
        assert (mask.sum(1) == 14).all()  # exactly round(0.3 * 20) = 6 hidden per sequence
        assert (values[~mask] == 0).all()
        assert values.min() >= 0 and values.max() <= 1
        gaps = times.diff(dim=1)
        assert times[:, 0].eq(0).all() and gaps.min() >= 0.05 - 1e-6 and gaps.max() <= 0.15 + 1e-6
        clean = ds.truth[split]["frames"]
        residual = values[mask] - clean[mask]
        assert residual.abs().max() > 0.1 and residual.abs().max() <= 1
    assert ds.observed_fraction == pytest.approx(0.7)
    rounded = data.load("pendulum", sizes=(3, 0, 0), num_steps=10, missing=0.29, seed=0)
    assert (rounded.train.mask.sum(1) == 7).all()  # round(2.9) = 3 hidden
    # the missing steps differ from sequence to sequence
    assert not (ds.train.mask == ds.train.mask[:1]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"missing": 1.0}, r"missing must be a fraction in \[0, 1\)"),
        ({"missing": 0.99, "num_steps": 10}, "missing=0.99 hides all 10 steps"),
        ({"noise": -0.1}, "noise must be a number >= 0"),
        ({"num_steps": 1}, "num_steps must be an integer >= 2"),
        ({"dt": 0.0}, "dt must be a positive number"),
        ({"sizes": (10, 2)}, r"sizes must be three integers"),
        ({"sizes": (0, 2, 2)}, r"sizes must be three integers"),
        ({"size": 3}, "size must be an integer >= 4"),
        ({"damping": -1.0}, "damping must be a number >= 0"),
        ({"max_angle": 4.0}, r"max_angle must lie in \[0, pi\]"),
        ({"length": 0.0}, "length must be positive"),
    ],
)
def test_pendulum_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=f"dataset 'pendulum': {message}"):
        data.load("pendulum", **kwargs)


def test_sequence_sets_reject_unknown_keywords():
    with pytest.raises(TypeError, match="'binarize'"):
        data.load("pendulum", binarize="static")


# ---------------------------------------------------------------------------------------------
# Rotating digits
# ---------------------------------------------------------------------------------------------


def test_rotation_convention():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 1, 8, 8, generator=g)
    zero = _rotate_images(images, torch.zeros(5))
    assert torch.allclose(zero, images, atol=1e-6)
    quarter = _rotate_images(images, torch.full((5,), math.pi / 2))
    assert torch.allclose(quarter, torch.rot90(images, 1, dims=(-2, -1)), atol=1e-6)
    half = _rotate_images(images, torch.full((5,), -math.pi))
    assert torch.allclose(half, torch.rot90(images, 2, dims=(-2, -1)), atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        _rotate_images(torch.zeros(1, 1, 8, 6), torch.zeros(1))


def test_rotating_digits_defaults():
    ds = data.load("rotating-digits", seed=0)
    assert isinstance(ds, data.SequenceSplits) and ds.likelihood == "continuous_bernoulli"
    assert ds.num_steps == 20 and ds.event_shape == (1, 8, 8)
    assert [len(getattr(ds, s).values) for s in ("train", "valid", "test")] == [1257, 180, 360]
    assert ds.observed_fraction == pytest.approx(0.6)
    for split in ("train", "valid", "test"):
        values, times, mask = getattr(ds, split)
        assert (mask.sum(1) == 12).all() and (values[~mask] == 0).all()
        assert values.min() >= 0 and values.max() <= 1
        assert torch.equal(values[mask], ds.truth[split]["frames"][mask])
    # the source digits are split as load("digits") splits them, labels included
    digits = data.load("digits", seed=0, binarize=None)
    assert torch.equal(ds.truth["test"]["digits"].reshape(360, 64), digits.test)
    assert torch.equal(ds.test_labels, digits.test_labels)
    # the angle paths are smooth and have marginal sd angle_scale = pi / 2. 1,257 independent
    # paths: each step's variance estimate has relative sd sqrt(2 / 1256) = 4% (its mean over
    # the 20 correlated steps at most that), so the sd estimate has relative SE <= 2%; band
    # 5 SE (10%): a 20% error in the sd lies 10 SE away
    angles = ds.truth["train"]["angles"].double()
    assert angles.shape == (1257, 20)
    relative_se = 0.5 * (2 / (angles.shape[0] - 1)) ** 0.5
    assert angles.var(0).mean().sqrt() == pytest.approx(math.pi / 2, rel=5 * relative_se)
    assert angles.diff(dim=1).abs().max() < 1.5  # no jumps between steps
    assert angles.diff(dim=1).abs().mean() < 0.5


def test_rotating_digits_at_angle_zero_repeat_the_source_digit():
    ds = data.load("rotating-digits", sizes=(5, 2, 2), angle_scale=0.0, missing=0.0, seed=1)
    digits = ds.truth["train"]["digits"]  # (5, 1, 8, 8)
    assert (ds.truth["train"]["angles"] == 0).all()
    expected = digits[:, None].expand(5, 20, 1, 8, 8)
    assert torch.allclose(ds.train.values, expected, atol=1e-6)


def test_rotating_digits_deterministic_sizes_and_options():
    kwargs = {"sizes": (10, 3, 3), "num_steps": 8, "missing": 0.25, "noise": 0.05}
    ds = data.load("rotating-digits", seed=2, **kwargs)
    again = data.load("rotating-digits", seed=2, **kwargs)
    other = data.load("rotating-digits", seed=3, **kwargs)
    for split in ("train", "valid", "test"):
        for a, b in zip(getattr(ds, split), getattr(again, split), strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(ds.truth["train"]["angles"], other.truth["train"]["angles"])
    assert ds.train.values.shape == (10, 8, 1, 8, 8) and (ds.train.mask.sum(1) == 6).all()
    observed = ds.train.values[ds.train.mask]
    assert not torch.equal(observed, ds.truth["train"]["frames"][ds.train.mask])  # noisy
    irregular = data.load("rotating-digits", sizes=(4, 1, 1), irregular=True, seed=0)
    gaps = irregular.train.times.diff(dim=1)
    assert gaps.min() >= 0.5 - 1e-6 and gaps.max() <= 1.5 + 1e-6 and gaps.std() > 0
    with pytest.raises(ValueError, match=r"sizes \(2000, 1, 1\) exceed the digits splits"):
        data.load("rotating-digits", sizes=(2000, 1, 1))
    with pytest.raises(ValueError, match="source must be one of"):
        data.load("rotating-digits", source="fashion")
    with pytest.raises(ValueError, match="angle_scale must be >= 0"):
        data.load("rotating-digits", angle_scale=-1.0)


def test_rotating_mnist5k_digits():
    ds = data.load("rotating-digits", source="mnist5k", sizes=(3, 1, 1), num_steps=4, seed=0)
    assert ds.event_shape == (1, 28, 28) and ds.train_labels.shape == (3,)
    assert ds.train.values.max() <= 1 and ds.train.values.min() >= 0
