"""Sliced and distributional sliced Wasserstein distances against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from pvae.diagnostics import distributional_sliced_wasserstein, sliced_wasserstein
from pvae.diagnostics.wasserstein import projected_wasserstein, random_directions


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identical_samples_are_at_distance_zero():
    x = torch.randn(300, 5, generator=_gen(1))
    assert float(sliced_wasserstein(x, x.clone(), generator=_gen())) < 1e-6
    assert float(distributional_sliced_wasserstein(x, x.clone(), generator=_gen())) < 1e-6


def test_one_dimensional_projection_is_the_sorted_coupling():
    # on one direction with n == m: W_p^p is the mean of |sorted differences|^p
    x, y = torch.tensor([[0.0], [3.0], [1.0]]), torch.tensor([[2.0], [-1.0], [5.0]])
    value = projected_wasserstein(x, y, torch.ones(1, 1), p=2.0)
    expected = ((0 - -1) ** 2 + (1 - 2) ** 2 + (3 - 5) ** 2) / 3
    assert value.item() == pytest.approx(expected)
    # unequal sizes: quantile functions at bin midpoints; a point mass against itself is 0
    assert projected_wasserstein(torch.ones(3, 1), torch.ones(5, 1), torch.ones(1, 1)).item() == 0


def test_sliced_wasserstein_of_shifted_gaussians_matches_closed_form():
    # SW_2^2(N(m1, I), N(m2, I)) = |m1 - m2|^2 / d for uniform directions. Tolerance: with
    # n = 4000 points the sorted coupling adds O(1/sqrt(n)) per direction and the 2000
    # directions a Monte-Carlo error of about sd((theta^T u)^2) / sqrt(2000) = 3% relative.
    d, n = 4, 4000
    shift = torch.tensor([2.0, -1.0, 0.5, 1.0])
    x = torch.randn(n, d, generator=_gen(2))
    y = torch.randn(n, d, generator=_gen(3)) + shift
    sw = sliced_wasserstein(x, y, num_projections=2000, generator=_gen(4))
    expected = math.sqrt(float(shift.pow(2).sum()) / d)
    assert sw.item() == pytest.approx(expected, rel=0.06)


def test_dswd_exceeds_sw_and_approaches_the_largest_projection():
    # the most discriminative direction is the shift: W_2 along it is |m1 - m2| = 3, while
    # SW_2 = 3 / sqrt(d). DSWD lies in between and above SW by a wide margin.
    d, n = 8, 1000
    shift = torch.zeros(d)
    shift[0] = 3.0
    x = torch.randn(n, d, generator=_gen(5))
    y = torch.randn(n, d, generator=_gen(6)) + shift
    sw = sliced_wasserstein(x, y, num_projections=500, generator=_gen(7)).item()
    dswd = distributional_sliced_wasserstein(
        x, y, num_projections=100, regularization=0.1, num_steps=50, generator=_gen(8)
    ).item()
    assert sw == pytest.approx(3 / math.sqrt(d), rel=0.1)
    assert dswd > 1.5 * sw
    assert dswd <= 3.0 * 1.05  # never beyond the max-sliced distance (+ sampling error)


def test_dswd_with_strong_regularization_stays_near_sw():
    # a large lambda keeps the directions spread: DSWD ~ SW (within Monte-Carlo error)
    d, n = 4, 1000
    x = torch.randn(n, d, generator=_gen(9))
    y = torch.randn(n, d, generator=_gen(10)) + 1.0
    sw = sliced_wasserstein(x, y, num_projections=500, generator=_gen(11)).item()
    dswd = distributional_sliced_wasserstein(
        x, y, num_projections=500, regularization=100.0, num_steps=10, generator=_gen(12)
    ).item()
    assert dswd == pytest.approx(sw, rel=0.15)


def test_random_directions_are_unit_vectors():
    directions = random_directions(50, 7, _gen())
    assert directions.shape == (50, 7)
    assert torch.allclose(directions.norm(dim=1), torch.ones(50))


def test_sliced_wasserstein_is_differentiable_in_the_samples():
    x = torch.randn(50, 3, generator=_gen(13), requires_grad=True)
    y = torch.randn(50, 3, generator=_gen(14))
    sliced_wasserstein(x, y, generator=_gen()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "x, y, kwargs, match",
    [
        (torch.zeros(5), torch.zeros(5, 1), {}, "x must have shape"),
        (torch.zeros(5, 2), torch.zeros(5, 3), {}, "same dimension"),
        (torch.full((5, 2), math.nan), torch.zeros(5, 2), {}, "NaN"),
        (torch.zeros(5, 2), torch.zeros(5, 2), {"p": 0.5}, "p must be"),
        (torch.zeros(5, 2), torch.zeros(5, 2), {"num_projections": 0}, "num_projections"),
    ],
)
def test_bad_input_is_refused(x, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sliced_wasserstein(x, y, **kwargs)
