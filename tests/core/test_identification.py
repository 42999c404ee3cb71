"""identification_r2: exact on planted affine maps, about 0 on independent noise."""

from __future__ import annotations

import pytest
import torch

from pvae.diagnostics import Identification, identification_r2


def _groups(seed: int = 0, n: int = 200, steps: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "shared": torch.randn(n, steps, 2, generator=g),
        "neural": torch.randn(n, steps, 1, generator=g),
    }


@pytest.mark.parametrize("holdout", [True, False])
def test_planted_affine_maps_score_one_and_independent_groups_zero(holdout):
    true = _groups(0)
    g = torch.Generator().manual_seed(1)
    inferred = {
        "shared": true["shared"] @ torch.randn(2, 3, generator=g) + 4.0,  # affine, more dims
        "neural": -2.5 * true["neural"] + 1.0,
    }
    result = identification_r2(inferred, true, holdout=holdout)
    assert isinstance(result, Identification)
    assert result.diagonal["shared"] == pytest.approx(1.0, abs=1e-9)
    assert result.diagonal["neural"] == pytest.approx(1.0, abs=1e-9)
    # independent groups: R^2 ~ 0 (4,000 rows per half, at most 3 predictors: |R^2| < 0.01)
    assert abs(result["shared", "neural"]) < 0.01
    assert abs(result["neural", "shared"]) < 0.01
    assert result.off_diagonal_max() < 0.01
    assert "shared" in result.table()


def test_noise_scores_about_zero_and_partial_information_in_between():
    true = _groups(0)
    noise = _groups(5)
    result = identification_r2(noise, true)
    assert torch.all(result.r2.abs() < 0.01)
    # half the variance explained: y = x + e with var(x) = var(e)
    g = torch.Generator().manual_seed(2)
    y = true["neural"] + torch.randn(true["neural"].shape, generator=g)
    half = identification_r2({"neural": true["neural"]}, {"neural": y})
    assert half.diagonal["neural"] == pytest.approx(0.5, abs=0.03)


def test_single_tensors_and_bad_input():
    x = torch.randn(10, 5, 2)
    assert identification_r2(x, 3 * x).diagonal["latent"] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="share"):
        identification_r2(x, torch.randn(10, 4, 2))
    with pytest.raises(ValueError, match="NaN"):
        identification_r2(x, torch.full((10, 5, 1), float("nan")))
    with pytest.raises(TypeError, match="tensor"):
        identification_r2({"a": [1.0]}, x)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"\(N, T, L\)"):
        identification_r2(torch.randn(3), x)
    with pytest.raises(ValueError, match="2 trials"):
        identification_r2(x[:1], x[:1])
