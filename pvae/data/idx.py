"""The IDX file reader (the MNIST format): :func:`read_idx` and the train/t10k pairs that the
``mnist`` and ``fashion-mnist`` sets read from the user's folder."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

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

    :param path: the file.
    :returns: array of shape ``(d_1, ..., d_ndim)`` in native byte order.
    :raises FileNotFoundError: the file does not exist.
    :raises ValueError: not an IDX file (bad magic number), or the payload is truncated or too
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
