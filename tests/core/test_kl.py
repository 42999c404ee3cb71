"""pvae.kl against closed forms, and the diagnostics' channel map on a sequence latent."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pvae.diagnostics import active_units, collapse_report, kl_per_dim, mutual_information
from pvae.kl import is_analytic, kl_elements, split_independent
from tests.mc_bands import assert_mean_within_se


def _normal_kl(mq, sq, mp, sp):
    return math.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


def test_analytic_elements_per_dimension():
    q = dist.Normal(torch.tensor([[0.5, -1.0]]), torch.tensor([[0.3, 2.0]])).to_event(1)
    p = dist.Normal(torch.zeros(1, 2), torch.ones(1, 2)).to_event(1)
    elements, event_dims = kl_elements(q, p)
    assert event_dims == 1 and elements.shape == (1, 2)
    expected = torch.tensor([[_normal_kl(0.5, 0.3, 0, 1), _normal_kl(-1.0, 2.0, 0, 1)]])
    torch.testing.assert_close(elements, expected)
    assert is_analytic(q, p)
    assert split_independent(q, p)[2] == 1


def test_monte_carlo_is_unbiased_for_the_closed_form():
    q = dist.Normal(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0])).to_event(1)
    p = dist.Laplace(torch.zeros(2), torch.ones(2)).to_event(1)
    exact, _ = kl_elements(q, p)  # registered in torch: -H[N] + log 2 + E|z|
    z = q.sample((200_000,))
    elements, event_dims = kl_elements(q, p, z, analytic=False)
    assert event_dims == 1 and elements.shape == (200_000, 2)
    # within 5 standard errors (sd of log q - log p over sqrt(2e5)), a band below 5% of each
    # element: a 20% error lies at least 4 bands away
    band = assert_mean_within_se(elements, exact)
    assert (band <= 0.05 * exact.abs()).all()
    with pytest.raises(ValueError, match="value="):
        kl_elements(q, dist.StudentT(3.0, torch.zeros(2), 1.0).to_event(1))


def test_unmatched_wrappers_give_one_joint_term():
    q = dist.MultivariateNormal(torch.zeros(2), torch.eye(2) * 0.25)
    p = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    z = q.sample((3,))
    elements, event_dims = kl_elements(q, p, z, analytic=True)
    assert event_dims == 0 and elements.shape == (3,)
    torch.testing.assert_close(elements, q.log_prob(z) - p.log_prob(z))


# -- a sequence latent: event shape (T, C) with a known KL per channel ----------------------------
T, C = 4, 3
LOC = torch.tensor([0.0, 1.0, 2.0])  # per channel; every step alike
SCALE = torch.tensor([1.0, 0.5, 0.25])


def seq_model(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], T, C), 1.0).to_event(2))


def seq_guide(x):
    with pyro.plate("data", x.shape[0]):
        loc = LOC * x[:, :1, None] + torch.zeros(x.shape[0], T, C)  # channel 0 ignores x
        pyro.sample("z", dist.Normal(loc, SCALE.expand(x.shape[0], T, C)).to_event(2))


def test_channel_map_reports_per_channel_kl_summed_over_time():
    x = torch.randn(50, 1, generator=torch.Generator().manual_seed(0))
    report = kl_per_dim(seq_model, seq_guide, x, channels={"z": -1})
    assert report.per_datapoint.shape == (50, C)
    expected = torch.stack(
        [
            torch.tensor(
                [T * _normal_kl(float(LOC[c] * xn), float(SCALE[c]), 0, 1) for c in range(C)]
            )
            for xn in x[:, 0]
        ]
    )
    torch.testing.assert_close(report.per_datapoint, expected.double(), atol=1e-5, rtol=1e-6)
    flat = kl_per_dim(seq_model, seq_guide, x)
    assert flat.dims == T * C
    assert flat.total == pytest.approx(report.total)
    for spec in ("channels_last", (1,), (-1,)):
        torch.testing.assert_close(
            kl_per_dim(seq_model, seq_guide, x, channels={"z": spec}).kl, report.kl
        )
    time_channels = kl_per_dim(seq_model, seq_guide, x, channels={"z": "channels_first"})
    assert time_channels.dims == T  # axis 0 (time) kept: KL per step summed over channels


def test_channel_map_in_activity_mutual_information_and_report():
    x = torch.randn(60, 1, generator=torch.Generator().manual_seed(1))
    units = active_units(seq_guide, x, channels={"z": -1})
    expected = LOC.double() ** 2 * x[:, 0].double().var()
    torch.testing.assert_close(units.variances, expected)
    assert units.active.tolist() == [False, True, True]
    mi = mutual_information(seq_guide, x, channels={"z": -1})
    assert mi.per_dim is not None and mi.per_dim.shape == (C,)
    assert abs(float(mi.per_dim[0])) < 1e-9 and float(mi.per_dim[2]) > float(mi.per_dim[1]) > 0
    report = collapse_report(seq_model, seq_guide, x, channels={"z": -1})
    assert report.layers["z"].dims == C
    # channel 0 has q = N(0, 1) = p: zero KL and inactive, so it collapsed
    assert report.layers["z"].collapsed_dims == [0]


def test_bad_channel_maps_are_refused():
    x = torch.randn(5, 1)
    with pytest.raises(ValueError, match="names no axis"):
        kl_per_dim(seq_model, seq_guide, x, channels={"z": 2})
    with pytest.raises(ValueError, match="channels_last"):
        kl_per_dim(seq_model, seq_guide, x, channels={"z": "last"})
    with pytest.raises(TypeError, match="mapping"):
        kl_per_dim(seq_model, seq_guide, x, channels=-1)  # type: ignore[arg-type]
