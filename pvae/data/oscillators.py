"""Generated multichannel time series for sequence generators: ``sines`` and ``oscillators``.

- ``sines`` (the sine benchmark of the time-series GAN literature, Yoon et al. 2019): per
  sequence and channel ``c``, a frequency ``f_c`` and a phase ``phi_c`` drawn from
  ``U(0, 0.1)``, ``x_t,c = (sin(f_c t + phi_c) + 1) / 2`` for ``t = 0..T-1``: values in
  ``[0, 1]``, 5 channels, ``T = 24``.
- ``oscillators``: a damped linear oscillator ``q'' + 2 zeta omega q' + omega^2 q = 0`` observed
  as ``(q, q' / omega)`` (``system="linear"``), or a damped nonlinear pendulum ``theta'' =
  -omega^2 sin(theta) - damping theta'`` observed as ``(theta, theta' / omega)``
  (``system="pendulum"``), sampled every ``dt``. Their Koopman eigenvalues are known: for the
  linear oscillator the flow over one step is ``expm(M dt)`` with eigenvalues
  ``exp(dt (-zeta omega +- i omega sqrt(1 - zeta^2)))``; for the damped pendulum the principal
  Koopman eigenvalues are those of the linearisation at the stable rest point,
  ``exp(dt (-damping / 2 +- i sqrt(omega^2 - damping^2 / 4)))`` (Mauroy & Mezic 2016). They
  are in ``info["eigenvalues"]`` as ``[real, imag]`` pairs; :func:`true_eigenvalues` returns
  them as a complex tensor.

Irregular sampling: ``missing`` hides that share of each sequence's rows (the mask is False
there and the values are zeros); the registered variants ``sines-30``, ``sines-50``,
``sines-70`` (and ``oscillators-30``...) drop 30%, 50% and 70% of the rows. Every split keeps the
complete, clean sequences as ``ds.truth[split]["complete"]`` ``(N, T, C)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pvae.data.containers import SequenceSplits
from pvae.data.registry import register
from pvae.data.sequences import (
    _check_options,
    _check_sizes,
    _missing_mask,
    _pendulum_path,
    _sequence_splits,
    _SequencePart,
    _split_streams,
    _time_grid,
)

__all__ = ["DROPPED_SHARES", "sines", "oscillators", "true_eigenvalues"]

DROPPED_SHARES = (0.3, 0.5, 0.7)
SYSTEMS = ("linear", "pendulum")


def sines(
    sizes: Sequence[int] = (1000, 250, 250),
    num_steps: int = 24,
    channels: int = 5,
    missing: float = 0.0,
    seed: int = 0,
) -> SequenceSplits:
    """The sine data set: ``(sin(f t + phi) + 1) / 2`` per channel, ``f, phi ~ U(0, 0.1)``.

    :param sizes: sequences in (train, valid, test).
    :param num_steps: T.
    :param channels: channels per step (5 in the literature).
    :param missing: share of rows hidden per sequence (irregular sampling), in ``[0, 1)``.
    :param seed: seeds every draw.
    :returns: :class:`SequenceSplits`, values ``(N, T, channels)`` in ``[0, 1]``, times ``0..T-1``.
    """
    name = "sines"
    counts = _check_sizes(name, sizes)
    _check_options(name, num_steps, 1.0, 0.0, missing, False)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"dataset {name!r}: channels must be a positive integer, got {channels!r}")
    parts = []
    steps = np.arange(num_steps, dtype=np.float64)
    for rng, n in zip(_split_streams(seed), counts, strict=True):
        frequency = rng.uniform(0.0, 0.1, size=(n, 1, channels))
        phase = rng.uniform(0.0, 0.1, size=(n, 1, channels))
        values = (np.sin(frequency * steps[:, None] + phase) + 1.0) / 2.0
        times = _time_grid(rng, n, num_steps, 1.0, False)
        mask = _missing_mask(rng, n, num_steps, missing)
        parts.append(_SequencePart(values, times, mask, {"complete": values}))
    info = {
        "description": "(sin(f t + phi) + 1) / 2 per channel, f and phi ~ U(0, 0.1)",
        "channels": channels,
        "missing": float(missing),
        "seed": seed,
    }
    return _sequence_splits(name, parts, "gaussian", info)


def true_eigenvalues(ds: SequenceSplits) -> Tensor:
    """The known Koopman eigenvalues of an ``oscillators`` data set (complex, ``(2,)``)."""
    pairs = ds.info.get("eigenvalues")
    if pairs is None:
        raise ValueError(f"dataset {ds.name!r} records no eigenvalues (load 'oscillators')")
    return torch.tensor([complex(re, im) for re, im in pairs], dtype=torch.complex64)


def oscillators(
    sizes: Sequence[int] = (1000, 250, 250),
    num_steps: int = 24,
    dt: float = 0.25,
    system: str = "linear",
    omega: float = 1.5,
    zeta: float = 0.05,
    max_amplitude: float = 1.0,
    noise: float = 0.0,
    missing: float = 0.0,
    seed: int = 0,
) -> SequenceSplits:
    """Damped oscillators with known Koopman eigenvalues (module docstring).

    :param system: ``"linear"`` (damped linear oscillator) or ``"pendulum"``.
    :param omega: natural angular frequency (rad per unit time).
    :param zeta: damping ratio in ``[0, 1)``; the pendulum's damping is ``2 zeta omega``.
    :param max_amplitude: the initial state ``(q, q' / omega)`` is drawn on a circle of radius
        ``U(max_amplitude / 2, max_amplitude)`` (radians for the pendulum, at most ``pi / 2``).
    :param noise: standard deviation of Gaussian noise added to the observations.
    :param missing: share of rows hidden per sequence (irregular sampling).
    :returns: :class:`SequenceSplits`, values ``(N, T, 2)``; ``info["eigenvalues"]``.
    """
    name = "oscillators"
    counts = _check_sizes(name, sizes)
    _check_options(name, num_steps, dt, noise, missing, False)
    if system not in SYSTEMS:
        raise ValueError(f"dataset {name!r}: system must be one of {SYSTEMS}, got {system!r}")
    if not (isinstance(omega, int | float) and math.isfinite(omega) and omega > 0):
        raise ValueError(f"dataset {name!r}: omega must be positive, got {omega!r}")
    if not (isinstance(zeta, int | float) and 0 <= zeta < 1):
        raise ValueError(f"dataset {name!r}: zeta must lie in [0, 1), got {zeta!r}")
    limit = math.pi / 2 if system == "pendulum" else math.inf
    if not (isinstance(max_amplitude, int | float) and 0 < max_amplitude <= limit):
        raise ValueError(
            f"dataset {name!r}: max_amplitude must lie in (0, {limit}], got {max_amplitude!r}"
        )
    rate = complex(-zeta * omega, omega * math.sqrt(1 - zeta**2))
    eigenvalues = [np.exp(dt * rate), np.exp(dt * rate.conjugate())]
    generator = np.array([[0.0, omega], [-omega, -2 * zeta * omega]])  # d/dt (q, q'/omega)
    w, v = np.linalg.eig(generator)
    step = (v @ np.diag(np.exp(w * dt)) @ np.linalg.inv(v)).real  # expm(M dt)
    parts = []
    for rng, n in zip(_split_streams(seed), counts, strict=True):
        radius = rng.uniform(max_amplitude / 2, max_amplitude, size=n)
        angle = rng.uniform(0.0, 2 * math.pi, size=n)
        start = np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)
        times = _time_grid(rng, n, num_steps, dt, False)
        if system == "linear":
            states = [start]
            for _ in range(num_steps - 1):
                states.append(states[-1] @ step.T)
            clean = np.stack(states, 1)
        else:
            theta, velocity = _pendulum_path(
                start[:, 0], omega * start[:, 1], times, omega**2, 1.0, 2 * zeta * omega
            )
            clean = np.stack([theta, velocity / omega], -1)
        values = clean + noise * rng.standard_normal(clean.shape)
        mask = _missing_mask(rng, n, num_steps, missing)
        parts.append(_SequencePart(values, times, mask, {"complete": clean}))
    info = {
        "description": (
            "damped linear oscillator observed as (q, q'/omega)"
            if system == "linear"
            else "damped pendulum observed as (theta, theta'/omega)"
        ),
        "system": system,
        "omega": float(omega),
        "zeta": float(zeta),
        "dt": float(dt),
        "noise": float(noise),
        "missing": float(missing),
        "eigenvalues": [[float(e.real), float(e.imag)] for e in eigenvalues],
        "seed": seed,
    }
    return _sequence_splits(name, parts, "gaussian", info)


register(
    "sines",
    "5 sine channels, T=24, frequency and phase ~ U(0, 0.1) (time-series GAN benchmark)",
    "seeded generator (pvae.data)",
)(sines)
register(
    "oscillators",
    "damped linear oscillator or pendulum, 2 channels, T=24, known Koopman eigenvalues",
    "seeded generator (pvae.data)",
)(oscillators)


def _dropped(loader, share: float):
    def variant(**kwargs) -> SequenceSplits:
        if "missing" in kwargs:
            raise TypeError("this variant fixes missing; load the base data set to choose it")
        return loader(missing=share, **kwargs)

    variant.__wrapped__ = loader  # type: ignore[attr-defined]  # load() reads its signature
    return variant


for _share in DROPPED_SHARES:
    _percent = round(100 * _share)
    register(
        f"sines-{_percent}",
        f"sines with {_percent}% of each sequence's rows dropped (irregular sampling)",
        "seeded generator (pvae.data)",
    )(_dropped(sines, _share))
    register(
        f"oscillators-{_percent}",
        f"oscillators with {_percent}% of each sequence's rows dropped (irregular sampling)",
        "seeded generator (pvae.data)",
    )(_dropped(oscillators, _share))
