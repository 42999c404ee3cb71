"""pvae.gaussian.product_of_experts against hand computations."""

from __future__ import annotations

import pytest
import torch

from pvae.gaussian import product_of_experts


def test_two_experts_and_a_prior_by_hand():
    # experts N(1, 1) and N(3, 0.5^2), prior N(0, 2^2): precisions 1, 4, 0.25 add to 5.25
    loc = torch.tensor([[1.0], [3.0]])
    scale = torch.tensor([[1.0], [0.5]])
    mean, std = product_of_experts(loc, scale, prior=(0.0, 2.0))
    assert std.item() == pytest.approx(5.25**-0.5)
    assert mean.item() == pytest.approx((1 * 1 + 4 * 3 + 0.25 * 0) / 5.25)


def test_weights_leave_out_absent_experts_and_the_prior_weight_applies():
    loc = torch.tensor([[[1.0, -2.0], [3.0, 5.0]]])  # (1, M=2, D=2)
    scale = torch.tensor([[[1.0, 2.0], [0.5, 1.0]]])
    mean, std = product_of_experts(loc, scale, weights=torch.tensor([[[1.0], [0.0]]]))
    assert torch.allclose(mean, loc[:, 0]) and torch.allclose(std, scale[:, 0])
    mean, std = product_of_experts(
        loc, scale, weights=torch.zeros(1, 2, 1), prior=(0.5, 3.0), prior_weight=1.0
    )
    assert torch.allclose(mean, torch.full((1, 2), 0.5)) and torch.allclose(
        std, torch.full((1, 2), 3.0)
    )


def test_it_is_the_normalised_density_product():
    torch.manual_seed(0)
    loc, scale = torch.randn(3, 4), torch.rand(3, 4) + 0.3
    mean, std = product_of_experts(loc, scale, prior=(torch.zeros(4), torch.ones(4)), dim=0)
    z = torch.linspace(-3, 3, 7)[:, None]
    log_product = torch.distributions.Normal(loc, scale).log_prob(z[:, None]).sum(1)
    log_product = log_product + torch.distributions.Normal(0.0, 1.0).log_prob(z)
    log_posterior = torch.distributions.Normal(mean, std).log_prob(z)
    difference = log_product - log_posterior  # constant in z: the normaliser
    assert torch.allclose(difference, difference[:1].expand_as(difference), atol=1e-5)
