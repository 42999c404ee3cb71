"""The containers every loader returns: :class:`Splits` (one tensor per split, or a
:class:`DynamicBinarized` train set), :class:`MultimodalSplits` (a tuple of tensors per split, one
per modality) and :class:`SequenceSplits` (a :class:`SequenceSplit` ``(values, times, mask)`` per
split), with the seeded permutation that cuts a pool into splits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

BINARIZE_CHOICES: tuple[str | None, ...] = (None, "static", "dynamic")


class DynamicBinarized(Dataset):
    """A binary dataset re-sampled on every access: ``x ~ Bernoulli(probs)``.

    Each ``__getitem__`` draws fresh pixels from torch's global RNG (seed it with
    ``torch.manual_seed`` / ``pyro.set_rng_seed``), which regularises training on binarised
    images (Salakhutdinov & Murray, 2008).

    :param probs: grey levels in ``[0, 1]``, shape ``(N, x_dim)``.

    Indexing with an int returns ``(x_dim,)``; with a slice, a list or a LongTensor of
    indices it returns a batch ``(B, x_dim)``. ``__getitems__`` (used by
    ``torch.utils.data.DataLoader``) returns a stacked ``(B, x_dim)`` batch.
    """

    def __init__(self, probs: Tensor) -> None:
        if not isinstance(probs, Tensor) or probs.dim() != 2:
            raise ValueError(
                "DynamicBinarized: probs must be a 2-D tensor (N, x_dim), got "
                f"{type(probs).__name__} of shape {tuple(getattr(probs, 'shape', ()))}"
            )
        if probs.numel() and (probs.min() < 0 or probs.max() > 1):
            raise ValueError("DynamicBinarized: probs must lie in [0, 1]")
        self.probs = probs

    def __len__(self) -> int:
        return self.probs.shape[0]

    @property
    def shape(self) -> torch.Size:
        """``(N, x_dim)``, as for the tensor it stands in for."""
        return self.probs.shape

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor | np.ndarray) -> Tensor:
        if isinstance(index, bool):
            raise TypeError("DynamicBinarized: cannot index with a bool")
        if isinstance(index, int | np.integer | slice):
            probs = self.probs[index]
        elif isinstance(index, Tensor):
            if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
                raise TypeError(
                    f"DynamicBinarized: index tensor must hold integers, got {index.dtype}"
                )
            probs = self.probs[index.long()]
        elif isinstance(index, Sequence | np.ndarray):
            probs = self.probs[torch.as_tensor(np.asarray(index), dtype=torch.long)]
        else:
            raise TypeError(
                "DynamicBinarized: index must be an int, a slice, a sequence of ints or a "
                f"LongTensor, got {type(index).__name__}"
            )
        return torch.bernoulli(probs)

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        """Draw the batch ``(len(indices), x_dim)`` in one call."""
        return self[list(indices)]

    def __repr__(self) -> str:
        return f"DynamicBinarized(N={len(self)}, x_dim={self.probs.shape[1]})"


class DatasetInfo(NamedTuple):
    """One registry entry, as listed by :func:`available` and ``pvae datasets``."""

    name: str
    description: str
    source: str


def _on_device(values: Any, device: torch.device) -> Any:
    """Tensors, tuples of them, sequence splits and dynamically binarised sets on ``device``."""
    if isinstance(values, SequenceSplit):
        return SequenceSplit(*(item.to(device) for item in values))
    if isinstance(values, tuple):
        return tuple(_on_device(item, device) for item in values)
    if isinstance(values, DynamicBinarized):
        return DynamicBinarized(values.probs.to(device))
    return values.to(device) if isinstance(values, Tensor) else values


@dataclass
class Splits:
    """A dataset split three ways.

    :ivar name: registry name.
    :ivar train: ``(N_train, x_dim)`` float32 tensor, or a :class:`DynamicBinarized` dataset.
    :ivar valid: ``(N_valid, x_dim)`` float32 tensor.
    :ivar test: ``(N_test, x_dim)`` float32 tensor.
    :ivar x_dim: number of observed dimensions.
    :ivar image_shape: ``(channels, height, width)`` for image sets, else ``None``.
    :ivar likelihood: the likelihood name that suits the data (``"bernoulli"``,
        ``"continuous_bernoulli"``, ``"gaussian"``).
    :ivar train_labels, valid_labels, test_labels: ``(N_split,)`` LongTensors, or ``None``.
    :ivar info: extra truth (for synthetic sets: the generating parameters) and provenance.
    """

    name: str
    train: Tensor | DynamicBinarized
    valid: Tensor
    test: Tensor
    x_dim: int
    image_shape: tuple[int, ...] | None
    likelihood: str
    train_labels: Tensor | None = None
    valid_labels: Tensor | None = None
    test_labels: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> Splits:
        """These splits with their tensors on ``device`` (of the same class; labels, truth and
        info stay where they are): each split's tensor, tuple of tensors or
        :class:`SequenceSplit` moved with ``.to(device)``, a :class:`DynamicBinarized` set
        rebuilt on its moved ``probs``. On the CPU, ``self`` itself."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        splits = ("train", "valid", "test")
        moved = {name: _on_device(getattr(self, name), device) for name in splits}
        return dataclasses.replace(self, **moved)

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, train={len(self.train)}, valid={len(self.valid)}, "
            f"test={len(self.test)}, x_dim={self.x_dim}, image_shape={self.image_shape}, "
            f"likelihood={self.likelihood!r})"
        )


@dataclass(repr=False)
class MultimodalSplits(Splits):
    """:class:`Splits` of paired modalities: ``train``, ``valid`` and ``test`` are tuples of
    ``(N_split, dim_m)`` float32 tensors, one per modality in the order of ``modalities``, so
    that ``pvae.fit(mm.model, mm.guide, ds.train)`` passes them as positional arguments (append
    a ``(N, M)`` boolean mask to the tuple for missing modalities).

    Attributes besides those of :class:`Splits`, where ``x_dim``, ``image_shape`` and
    ``likelihood`` describe the first modality, the image:

    :ivar modalities: name -> ``{"dim", "likelihood", ...}``, the keyword arguments of
        ``pvae.models.multimodal.Modality`` (also in ``info["modalities"]``), so that
        ``MultimodalVAE(ds.modalities, z_dim)`` fits the data.
    """

    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __repr__(self) -> str:
        def count(split: Any) -> int:
            return int(split[0].shape[0]) if isinstance(split, tuple) else len(split)

        return (
            f"MultimodalSplits(name={self.name!r}, modalities={list(self.modalities)}, "
            f"train={count(self.train)}, valid={count(self.valid)}, test={count(self.test)})"
        )


class SequenceSplit(NamedTuple):
    """One split of sequences, ``(values, times, mask)``.

    A :class:`NamedTuple`, hence a tuple: ``pvae.fit(model, guide, ds.train)`` and
    ``pvae.log_likelihood(model, guide, ds.test)`` pass it to the pair as three positional
    arguments, ``model(values, times, mask)`` / ``guide(values, times, mask)``, minibatched
    along the first (sequence) dimension like any tuple of tensors.

    :ivar values: ``(N, T, *event_shape)`` floating tensor. Only the entries where ``mask`` is
        True are data; the others are placeholders (the generators write zeros there, a
        user's own data may hold NaN) that a model must not score.
    :ivar times: ``(N, T)`` floating tensor, strictly increasing along each sequence; the grid
        may be irregular and differ between sequences.
    :ivar mask: ``(N, T)`` bool tensor, True where the step is observed.
    """

    values: Tensor
    times: Tensor
    mask: Tensor


def _check_sequence_split(where: str, split: Any) -> None:
    """Raise a ValueError/TypeError naming ``where`` (e.g. ``"SequenceSplits 'pendulum': the
    train split"``) and what is wrong with ``split``."""
    if not isinstance(split, SequenceSplit):
        raise TypeError(
            f"{where} must be a SequenceSplit(values, times, mask), got {type(split).__name__}"
        )
    values, times, mask = split
    for label, tensor in (("values", values), ("times", times), ("mask", mask)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{where}: {label} must be a tensor, got {type(tensor).__name__}")
    if values.dim() < 2 or not values.is_floating_point():
        raise ValueError(
            f"{where}: values must be a floating tensor (N, T, *event_shape), got "
            f"{values.dtype} of shape {tuple(values.shape)}"
        )
    steps = tuple(values.shape[:2])
    if mask.dtype != torch.bool:
        raise ValueError(f"{where}: mask must be a bool tensor (True = observed), got {mask.dtype}")
    for label, tensor in (("times", times), ("mask", mask)):
        if tuple(tensor.shape) != steps:
            raise ValueError(
                f"{where}: {label} must have shape (N, T) = {steps} to match values of shape "
                f"{tuple(values.shape)}, got {tuple(tensor.shape)}"
            )
    if not times.is_floating_point():
        raise ValueError(f"{where}: times must be a floating tensor, got {times.dtype}")
    if not torch.isfinite(times).all():
        raise ValueError(f"{where}: times hold {int((~torch.isfinite(times)).sum())} NaN/inf")
    observed = values[mask]
    if not torch.isfinite(observed).all():
        bad = int((~torch.isfinite(observed)).sum())
        raise ValueError(f"{where}: values hold {bad} NaN/inf value(s) at observed steps")
    if times.shape[1] > 1:
        steps_ok = times[:, 1:] > times[:, :-1]
        if not steps_ok.all():
            sequence, step = (int(i) for i in (~steps_ok).nonzero()[0])
            raise ValueError(
                f"{where}: times must be strictly increasing along each sequence; sequence "
                f"{sequence} has times[{step + 1}] = {float(times[sequence, step + 1]):g} <= "
                f"times[{step}] = {float(times[sequence, step]):g}"
            )


@dataclass(repr=False)
class SequenceSplits(Splits):
    """:class:`Splits` of sequences: ``train``, ``valid`` and ``test`` are
    :class:`SequenceSplit` ``(values, times, mask)`` tuples (see there for how a pair receives
    them), checked at construction.

    Attributes besides those of :class:`Splits` (``x_dim`` and ``image_shape`` are derived
    from the values and not passed):

    :ivar x_dim: ``prod(event_shape)``, the size of one step.
    :ivar image_shape: ``event_shape`` when it is ``(channels, height, width)``, else None.
    :ivar likelihood: the likelihood of one observed step (e.g. ``"continuous_bernoulli"``).
    :ivar train_labels, valid_labels, test_labels: ``(N_split,)``, one label per sequence
        (e.g. the class of a rotating digit), or None.
    :ivar truth: split name -> {name -> tensor with ``N_split`` rows}: the generating truth per
        sequence, e.g. ``truth["test"]["angles"]`` ``(N_test, T)`` and the clean, complete
        frames ``truth["test"]["frames"]`` ``(N_test, T, *event_shape)`` that score an
        imputation of the missing steps. Empty when unknown.
    :ivar info: the generating parameters and provenance.

    Properties: :attr:`event_shape`, :attr:`num_steps` (``T``), :attr:`observed_fraction`.

    :raises TypeError, ValueError: naming the split and what is wrong: a split that is not a
        :class:`SequenceSplit`, values that are not ``(N, T, *event_shape)`` floats, times
        or mask not ``(N, T)``, a mask that is not bool, NaN/inf at an observed step or in
        the times, times not strictly increasing, splits that disagree on ``T`` or
        ``event_shape``, or a truth tensor whose rows do not match its split.
    """

    x_dim: int = field(init=False)
    image_shape: tuple[int, ...] | None = field(init=False)
    truth: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"SequenceSplits {self.name!r}"
        for split in ("train", "valid", "test"):
            _check_sequence_split(f"{where}: the {split} split", getattr(self, split))
        train = self.train
        assert isinstance(train, SequenceSplit)
        shape = tuple(train.values.shape[1:])
        for split in ("valid", "test"):
            other = tuple(getattr(self, split).values.shape[1:])
            if other != shape:
                raise ValueError(
                    f"{where}: the {split} split has steps x event shape {other}, the train "
                    f"split {shape}; every split must share T and event_shape"
                )
        event_shape = shape[1:]
        self.x_dim = math.prod(event_shape)
        self.image_shape = event_shape if len(event_shape) == 3 else None
        unknown = sorted(set(self.truth) - {"train", "valid", "test"})
        if unknown:
            raise ValueError(f"{where}: truth keys must be split names, got {unknown}")
        for split, entries in self.truth.items():
            rows = getattr(self, split).values.shape[0]
            for key, tensor in entries.items():
                if not isinstance(tensor, Tensor) or tensor.dim() == 0 or tensor.shape[0] != rows:
                    raise ValueError(
                        f"{where}: truth[{split!r}][{key!r}] must be a tensor with {rows} rows "
                        f"(one per sequence), got shape {tuple(getattr(tensor, 'shape', ()))}"
                    )

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one step's value, e.g. ``(1, 16, 16)`` for a grey 16x16 frame."""
        return tuple(self.train.values.shape[2:])  # type: ignore[union-attr]

    @property
    def num_steps(self) -> int:
        """``T``, the number of time steps of every sequence (observed or not)."""
        return int(self.train.values.shape[1])  # type: ignore[union-attr]

    @property
    def observed_fraction(self) -> float:
        """The fraction of observed steps over the three splits."""
        masks = [getattr(self, split).mask for split in ("train", "valid", "test")]
        total = sum(int(mask.numel()) for mask in masks)
        return sum(int(mask.sum()) for mask in masks) / total if total else 1.0

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{split}={getattr(self, split).values.shape[0]}"
            for split in ("train", "valid", "test")
        )
        return (
            f"SequenceSplits(name={self.name!r}, {sizes}, num_steps={self.num_steps}, "
            f"event_shape={self.event_shape}, likelihood={self.likelihood!r}, "
            f"observed={self.observed_fraction:.0%})"
        )


def rows(values: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a split: a tensor ``(N, ...)``, a tuple of them (modalities), a
    :class:`SequenceSplit` ``(values (N, T, ...), times (N, T), mask (N, T))`` or a
    :class:`DynamicBinarized` set (the rows stay dynamically binarised)."""
    if isinstance(values, SequenceSplit):
        return SequenceSplit(*(item[start:stop] for item in values))
    if isinstance(values, tuple):
        return tuple(rows(item, start, stop) for item in values)
    if isinstance(values, DynamicBinarized):
        return DynamicBinarized(values.probs[start:stop])
    return values[start:stop]


def subset(ds: Splits, max_train: int | None = None, max_eval: int | None = None) -> Splits:
    """``ds`` cut to its first ``max_train`` training and ``max_eval`` valid and test points
    (:func:`load` has shuffled them; None keeps a split whole), labels included: a quick run
    on a small part of a data set. Tuples of modalities, sequence splits and their generating
    truth (``ds.truth[split]``, a row per sequence) are cut row-wise (:func:`rows`).

    :raises ValueError, TypeError: ``max_train`` or ``max_eval`` not a positive integer.
    """
    from pvae.validation import positive_int

    max_train = None if max_train is None else positive_int(max_train, "max_train")
    max_eval = None if max_eval is None else positive_int(max_eval, "max_eval")
    limits = {"train": max_train, "valid": max_eval, "test": max_eval}

    def head(values: Any, limit: int | None) -> Any:
        return values if limit is None or values is None else rows(values, 0, limit)

    cut = {}
    for split, limit in limits.items():
        for key in (split, f"{split}_labels"):
            cut[key] = head(getattr(ds, key), limit)
    if isinstance(ds, SequenceSplits):
        cut["truth"] = {
            split: {key: head(value, limits.get(split)) for key, value in truth.items()}
            for split, truth in ds.truth.items()
        }
    return dataclasses.replace(ds, **cut)


def _check_binarize(binarize: str | None) -> None:
    if binarize not in BINARIZE_CHOICES:
        raise ValueError(f"binarize must be one of {list(BINARIZE_CHOICES)}, got {binarize!r}")


def _permutation_split(n: int, sizes: Sequence[int], generator: torch.Generator) -> list[Tensor]:
    """Seeded permutation of ``range(n)`` cut into consecutive pieces of the given sizes."""
    if sum(sizes) != n:
        raise ValueError(f"split sizes {list(sizes)} do not add up to {n}")
    permutation = torch.randperm(n, generator=generator)
    return list(torch.split(permutation, list(sizes)))
