"""``mm-gp-sim``: simulated multimodal trials of Gondur et al. (2024), with their latent truth.

Each trial has T evenly spaced bins and three one-dimensional latent paths (by default), each
drawn from an RBF Gaussian process over time (``k(tau) = exp(-tau^2 / (2 l^2))``, unit
variance):

    z_s  shared          drives both modalities
    z_n  neural-only     drives the spike counts
    z_i  image-only      drives the images

- Neural modality: ``num_neurons`` Poisson spike counts per bin with GPFA-style rates
  ``exp(C [z_s, z_n] + d)``, ``C ~ N(0, loading^2)`` and ``d = log(base_rate)``, fixed per
  dataset (in ``info``).
- Image modality: one digit (scikit-learn's 8x8 digit of class ``digit``, the same for every
  trial), turned counter-clockwise by ``angle_scale * z_s`` radians and scaled by
  ``exp(scale_amount * z_i)`` about its centre (bilinear, zeros outside); grey levels in
  ``[0, 1]``.
- Missing modalities: each trial independently loses its neural modality with probability
  ``missing / 2`` and otherwise its image modality with probability ``missing / 2`` (never
  both); a missing modality's values are zeros.

Layout of a split (a :class:`MultimodalSequenceSplit`, a tuple that ``pvae.fit`` passes to the
pair as ``model(counts, frames, times, modality_mask)``)::

    counts         (N, T, num_neurons)  float32 whole numbers
    frames         (N, T, 1, 8, 8)      float32 in [0, 1]
    times          (N, T)               float32, 0, dt, 2 dt, ...
    modality_mask  (N, 2)               bool, columns ("neural", "image"), True = observed

Truth per split, ``ds.truth[split]``: ``"shared" (N, T, Ls)``, ``"neural" (N, T, Ln)``,
``"image" (N, T, Li)`` (the latent groups, ready for
:func:`pvae.diagnostics.identification_r2`), the ``"rates"`` and the clean, complete
``"frames"``. The splits draw from independent streams of ``SeedSequence(seed)``.

The set is not a :class:`~pvae.data.SequenceSplits` (two modalities per step), so the CLI's
sequence models do not take it; train it from Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pvae.data.containers import Splits
from pvae.data.images import _digits_pool
from pvae.data.registry import register_options
from pvae.data.sequences import SPLITS, _check_sizes, _split_streams

__all__ = ["MultimodalSequenceSplit", "MultimodalSequenceSplits", "MODALITY_COLUMNS"]

MODALITY_COLUMNS = ("neural", "image")
_NAME = "mm-gp-sim"


class MultimodalSequenceSplit(NamedTuple):
    """One split of ``mm-gp-sim``: ``(counts, frames, times, modality_mask)`` (see the module
    docstring for shapes)."""

    counts: Tensor
    frames: Tensor
    times: Tensor
    modality_mask: Tensor


@dataclass(repr=False)
class MultimodalSequenceSplits(Splits):
    """:class:`Splits` whose ``train``, ``valid`` and ``test`` are
    :class:`MultimodalSequenceSplit` tuples; ``x_dim``, ``image_shape`` and ``likelihood``
    describe the image modality.

    Attributes (besides those of :class:`Splits`):
        num_neurons: neurons of the neural modality.
        num_steps: T.
        truth: split -> {"shared", "neural", "image", "rates", "frames"} tensors.
    """

    num_neurons: int = 0
    num_steps: int = 0
    truth: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{split}={getattr(self, split).counts.shape[0]}"
            for split in ("train", "valid", "test")
        )
        return (
            f"MultimodalSequenceSplits(name={self.name!r}, {sizes}, num_steps={self.num_steps}, "
            f"num_neurons={self.num_neurons}, image_shape={self.image_shape})"
        )


def _rbf_paths(
    rng: np.random.Generator, n: int, num_steps: int, dims: int, lengthscale: float, dt: float
) -> np.ndarray:
    """``(n, T, dims)`` draws of independent unit-variance RBF GPs on the grid ``0, dt, ...``."""
    t = np.arange(num_steps) * dt
    kernel = np.exp(-((t[:, None] - t[None]) ** 2) / (2 * lengthscale**2))
    cholesky = np.linalg.cholesky(kernel + 1e-6 * np.eye(num_steps))
    return np.einsum("ts,nsd->ntd", cholesky, rng.standard_normal((n, num_steps, dims)))


def _rotate_and_scale(image: Tensor, angles: Tensor, scales: Tensor) -> Tensor:
    """``(M, C, H, H)`` copies of ``image (C, H, H)``, each turned counter-clockwise by
    ``angles[m]`` radians and magnified by ``scales[m]`` about the centre (bilinear)."""
    if angles.numel() == 0:
        return image.new_zeros(0, *image.shape)
    cos, sin = torch.cos(angles.double()), torch.sin(angles.double())
    zero = torch.zeros_like(cos)
    inverse = 1.0 / scales.double()  # the output samples the input at R(-angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * inverse, -sin * inverse, zero], -1),
            torch.stack([sin * inverse, cos * inverse, zero], -1),
        ],
        1,
    )
    images = image.double().expand(angles.shape[0], *image.shape)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp(0.0, 1.0).float()


@dataclass(frozen=True)
class _MMGPSimOptions:
    """The keywords of ``mm-gp-sim`` (see the module docstring), checked on construction;
    ``sizes`` are ``(train, valid, test)`` trial counts."""

    sizes: Sequence[int] = (400, 100, 100)
    num_steps: int = 50
    dt: float = 1.0
    lengthscale: float = 6.0
    num_neurons: int = 20
    shared_dim: int = 1
    neural_dim: int = 1
    image_dim: int = 1
    base_rate: float = 2.0
    loading: float = 0.6
    angle_scale: float = math.pi / 4
    scale_amount: float = 0.2
    digit: int = 2
    missing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        name = _NAME
        _check_sizes(name, self.sizes)
        for label, value in (
            ("num_steps", self.num_steps),
            ("num_neurons", self.num_neurons),
            ("shared_dim", self.shared_dim),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (2 if label == "num_steps" else 1)
            ):
                raise ValueError(
                    f"dataset {name!r}: {label} must be a positive integer, got {value!r}"
                )
        for label, value in (("neural_dim", self.neural_dim), ("image_dim", self.image_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"dataset {name!r}: {label} must be an integer >= 0, got {value!r}"
                )
        for label, number in (
            ("dt", self.dt),
            ("lengthscale", self.lengthscale),
            ("base_rate", self.base_rate),
        ):
            if not (isinstance(number, int | float) and math.isfinite(number) and number > 0):
                raise ValueError(
                    f"dataset {name!r}: {label} must be a positive number, got {number!r}"
                )
        for label, number in (
            ("loading", self.loading),
            ("angle_scale", self.angle_scale),
            ("scale_amount", self.scale_amount),
        ):
            if not (isinstance(number, int | float) and math.isfinite(number) and number >= 0):
                raise ValueError(f"dataset {name!r}: {label} must be a number >= 0, got {number!r}")
        if not (isinstance(self.missing, int | float) and 0 <= self.missing <= 1):
            raise ValueError(
                f"dataset {name!r}: missing must be a fraction in [0, 1], got {self.missing!r}"
            )
        if isinstance(self.digit, bool) or self.digit not in range(10):
            raise ValueError(f"dataset {name!r}: digit must be a class 0..9, got {self.digit!r}")


def _mm_gp_split(
    o: _MMGPSimOptions,
    rng: np.random.Generator,
    n: int,
    image: Tensor,
    C: np.ndarray,
    d: np.ndarray,
) -> tuple[MultimodalSequenceSplit, dict[str, Tensor]]:
    """``n`` trials drawn from ``rng``: the split and its truth (``C``, ``d``: the neural
    loading and offset)."""
    z = _rbf_paths(
        rng, n, o.num_steps, o.shared_dim + o.neural_dim + o.image_dim, o.lengthscale, o.dt
    )
    z_s, z_n, z_i = np.split(z, [o.shared_dim, o.shared_dim + o.neural_dim], axis=-1)
    rates = np.exp(np.concatenate([z_s, z_n], -1) @ C.T + d)
    counts = rng.poisson(rates).astype(np.float32)
    angles = torch.as_tensor(o.angle_scale * z_s[..., 0]).reshape(-1)
    scaled = z_i[..., 0] if o.image_dim else np.zeros((n, o.num_steps))
    scales = torch.as_tensor(np.exp(o.scale_amount * scaled)).reshape(-1)
    frames = _rotate_and_scale(image, angles, scales).reshape(n, o.num_steps, 1, 8, 8)
    drop = rng.random(n)
    modality_mask = np.ones((n, 2), dtype=bool)
    modality_mask[drop < o.missing / 2, 0] = False
    modality_mask[(drop >= o.missing / 2) & (drop < o.missing), 1] = False
    mask = torch.as_tensor(modality_mask)
    observed_counts = torch.as_tensor(counts) * mask[:, 0, None, None]
    observed_frames = frames * mask[:, 1, None, None, None, None]
    times = torch.as_tensor(np.arange(o.num_steps) * o.dt, dtype=torch.float32).expand(n, -1)
    split = MultimodalSequenceSplit(observed_counts, observed_frames, times.clone(), mask)
    truth = {
        "shared": torch.as_tensor(z_s, dtype=torch.float32),
        "neural": torch.as_tensor(z_n, dtype=torch.float32),
        "image": torch.as_tensor(z_i, dtype=torch.float32),
        "rates": torch.as_tensor(rates, dtype=torch.float32),
        "frames": frames,
    }
    return split, truth


@register_options(
    _NAME,
    "multimodal trials (Gondur et al. 2024): Poisson spikes of 20 neurons and a rotating, "
    "scaling digit, driven by shared and private RBF-GP latents (T=50): true latents known",
    "seeded generator over a scikit-learn 8x8 digit (pvae.data)",
    _MMGPSimOptions,
)
def _mm_gp_sim(o: _MMGPSimOptions) -> MultimodalSequenceSplits:
    """Draw ``mm-gp-sim`` (see the module docstring); ``sizes`` are ``(train, valid, test)``
    trial counts. With ``image_dim > 1`` or ``shared_dim > 1`` the rotation and scale are
    driven by the groups' first channels."""
    images, labels = _digits_pool(f"dataset {_NAME!r} needs")
    image = images[int(torch.nonzero(labels == o.digit)[0, 0])].reshape(1, 8, 8)
    streams = _split_streams(o.seed)
    loading_rng = np.random.default_rng(np.random.SeedSequence(o.seed).spawn(4)[3])
    C = o.loading * loading_rng.standard_normal((o.num_neurons, o.shared_dim + o.neural_dim))
    d = np.full(o.num_neurons, math.log(o.base_rate))
    splits: dict[str, MultimodalSequenceSplit] = {}
    truth: dict[str, dict[str, Tensor]] = {}
    for split, rng, n in zip(SPLITS, streams, _check_sizes(_NAME, o.sizes), strict=True):
        splits[split], truth[split] = _mm_gp_split(o, rng, n, image, C, d)
    info: dict[str, Any] = {
        "description": (
            "RBF-GP latents (shared, neural-only, image-only); Poisson counts with rates "
            "exp(C [z_s, z_n] + d); one 8x8 digit turned by angle_scale * z_s and scaled by "
            "exp(scale_amount * z_i)"
        ),
        "loading": torch.as_tensor(C, dtype=torch.float32),
        "offset": torch.as_tensor(d, dtype=torch.float32),
        "dims": {"shared": o.shared_dim, "neural": o.neural_dim, "image": o.image_dim},
        "modalities": MODALITY_COLUMNS,
        "lengthscale": float(o.lengthscale),
        "dt": float(o.dt),
        "angle_scale": float(o.angle_scale),
        "scale_amount": float(o.scale_amount),
        "digit": o.digit,
        "missing": float(o.missing),
        "seed": o.seed,
    }
    return MultimodalSequenceSplits(
        name=_NAME,
        train=splits["train"],  # type: ignore[arg-type]  # Splits annotates single tensors
        valid=splits["valid"],  # type: ignore[arg-type]
        test=splits["test"],  # type: ignore[arg-type]
        x_dim=64,
        image_shape=(1, 8, 8),
        likelihood="continuous_bernoulli",
        info=info,
        num_neurons=o.num_neurons,
        num_steps=o.num_steps,
        truth=truth,
    )
