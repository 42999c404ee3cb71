"""Image completion from quadrants (Sohn et al. 2015): :func:`quadrants` splits flattened images
into the given quadrants (the condition ``x`` of a CVAE) and the rest (the target ``y``);
:func:`quadrant_task` turns an image dataset into that conditional task."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pvae.data.containers import Splits

QUADRANT_ORDER: tuple[str, ...] = ("bottom-left", "top-left", "top-right", "bottom-right")
"""The order in which :func:`quadrants` reveals quadrants: ``num_given = 1`` gives the
bottom-left one, 2 the left half, 3 everything but the bottom-right quadrant (the protocol of
Sohn et al. 2015, as reproduced by Pyro's CVAE tutorial)."""


class Quadrants(NamedTuple):
    """An image-completion task: predict the hidden quadrants from the given ones.

    :ivar given: ``(N, num_given_pixels)``, the pixels of the given quadrants, in the images'
        flattened order (the conditioning input ``x`` of a CVAE).
    :ivar rest: ``(N, x_dim - num_given_pixels)``, the other pixels, in the same order (the
        target ``y``).
    :ivar given_mask: ``(x_dim,)`` bool, True where a pixel is given:
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

    :param images: ``(N, x_dim)``, flattened in ``(C, H, W)`` order (as every split of
        :func:`load`).
    :param num_given: 1, 2 or 3 quadrants given.
    :param image_shape: ``(C, H, W)`` or ``(H, W)``; None means square single-channel images
        (``H = W = sqrt(x_dim)``).
    :returns: :class:`Quadrants` ``(given, rest, given_mask)``.
    :raises ValueError: ``num_given`` not in {1, 2, 3}, ``images`` not 2-D, or a shape that does
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


class QuadrantPairs(torch.utils.data.Dataset):
    """``(given, rest)`` pairs of image quadrants (:func:`quadrants`) of an image split, row by
    row, so that a dynamically binarised training set stays dynamic."""

    def __init__(self, images: Any, given_mask: Tensor) -> None:
        self.images, self.given_mask = images, given_mask

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        row = self.images[index]
        return row[self.given_mask], row[~self.given_mask]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        rows = self.images[list(indices)]
        return rows[:, self.given_mask], rows[:, ~self.given_mask]


def quadrant_task(ds: Splits, given: int) -> Splits:
    """``ds`` as a conditional task: x = the first ``given`` quadrants of each image (``(N,
    x_dim_given)``), y = the rest (``(N, x_dim)``); ``info`` gains ``given_quadrants`` and
    ``x_dim_given``. A tensor split becomes a pair of tensors, any other a
    :class:`QuadrantPairs`."""
    mask = quadrants(torch.zeros(1, ds.x_dim), given, ds.image_shape).given_mask

    def split(values: Any) -> Any:
        if isinstance(values, Tensor):
            task = quadrants(values, given, ds.image_shape)
            return (task.given, task.rest)
        return QuadrantPairs(values, mask)

    info = {**ds.info, "given_quadrants": given, "x_dim_given": int(mask.sum())}
    return dataclasses.replace(
        ds,
        train=split(ds.train),
        valid=split(ds.valid),
        test=split(ds.test),
        x_dim=int((~mask).sum()),
        image_shape=None,
        info=info,
    )
