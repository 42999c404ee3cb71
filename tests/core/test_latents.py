"""Active units (Burda et al. 2016): Var_x(E_q[z|x]) per dimension against a threshold, for
any guide, read from the traced site's distribution."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions.transforms import AffineTransform

from pvae.diagnostics import ActiveUnits, active_units
from pvae.models import VAE

X = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))


def masked_guide(mask, scale=1.0, family="normal"):
    """q(z | x) whose mean is ``scale * x[:, d]`` where ``mask[d]`` and 0.3 elsewhere (a dim
    whose mean ignores x)."""
    mask = torch.tensor(mask)

    def guide(x):
        loc = torch.where(mask, scale * x, torch.full_like(x, 0.3))
        with pyro.plate("data", x.shape[0]):
            if family == "normal":
                pyro.sample("z", dist.Normal(loc, 0.5).to_event(1))
            elif family == "mvn":
                pyro.sample("z", dist.MultivariateNormal(loc, 0.25 * torch.eye(x.shape[1])))
            else:  # no closed-form .mean: the samples' average stands in for it
                shifted = dist.TransformedDistribution(
                    dist.Normal(torch.zeros_like(loc), 0.01), [AffineTransform(loc, 1.0)]
                )
                pyro.sample("z", shifted.to_event(1))

    return guide


@pytest.mark.parametrize("family", ["normal", "mvn", "transformed"])
def test_dims_that_ignore_x_are_inactive(family):
    result = active_units(masked_guide([True, False, True, False], family=family), X)
    assert isinstance(result, ActiveUnits)
    assert result.count == 2 and result.dims == 4
    assert result.active.tolist() == [True, False, True, False]
    assert result.variances[[1, 3]].abs().max() < 1e-3
    assert result.variances[[0, 2]].min() > 0.5  # Var(x_d) ~ 1


def test_variance_is_over_datapoints_with_any_batch_size():
    guide = masked_guide([True, True, True, True])
    expected = X.double().var(0)
    for batch_size in (7, 300, 1000):
        result = active_units(guide, X, batch_size=batch_size)
        torch.testing.assert_close(result.variances, expected)


def test_threshold_separates_small_from_large_variance():
    # Var(0.05 x) ~ 0.0025 < 0.01 < Var(0.2 x) ~ 0.04
    assert active_units(masked_guide([True] * 4, scale=0.05), X).count == 0
    assert active_units(masked_guide([True] * 4, scale=0.2), X).count == 4
    assert active_units(masked_guide([True] * 4, scale=0.05), X, threshold=1e-3).count == 4


def test_a_pvae_model_and_tuple_data_and_rng_left_alone():
    vae = VAE(x_dim=4, z_dim=3, hidden=(8,), likelihood="gaussian")
    state = torch.get_rng_state()
    result = active_units(vae.guide, (X,), batch_size=64)
    assert torch.equal(torch.get_rng_state(), state)
    assert result.dims == 3 and 0 <= result.count <= 3
    encoder_mean = vae.encode(X)[0].double()
    torch.testing.assert_close(result.variances, encoder_mean.var(0))


def test_unknown_site_names_the_guides_latents():
    with pytest.raises(ValueError, match="no latent site 'w'.*z"):
        active_units(masked_guide([True] * 4), X, site="w")


def test_needs_two_datapoints():
    with pytest.raises(ValueError, match="at least 2"):
        active_units(masked_guide([True] * 4), X[:1])


def test_directions_count_a_rotated_collapse_that_axes_miss():
    """Means x W with W of rank 2 in 3 dimensions, rotated: all three axes move with x, but the
    means span only two directions."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.7, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]) @ Q.T

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ W, 0.5).to_event(1))

    result = active_units(guide, X)
    assert result.count == 3 and result.active_directions == 2
    torch.testing.assert_close(result.directions.sum(), result.variances.sum())
    expected = torch.linalg.eigvalsh(torch.cov((X @ W).T.double())).flip(0)
    torch.testing.assert_close(result.directions, expected.clamp(min=0))


def test_an_upper_layer_is_not_credited_with_the_lower_layer_noise():
    """q(z1 | x) = N((x_0, 0), 1.2^2), q(z2 | z1) = N(z1, 0.1^2): E_q[z2 | x] = (x_0, 0), so
    Var_x E_q[z2 | x] = (1, 0). Read at one draw of z1, z2's mean would also carry z1's noise
    (1.44 on both axes) and the second axis would look active."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = torch.stack([x[:, 0], torch.zeros_like(x[:, 0])], -1)
            z1 = pyro.sample("z1", dist.Normal(loc, 1.2).to_event(1))
            pyro.sample("z2", dist.Normal(z1, 0.1).to_event(1))

    upper = active_units(guide, X, site="z2")
    assert upper.active.tolist() == [True, False] and upper.active_directions == 1
    assert upper.variances[1] < 0.01
    assert upper.variances[0] == pytest.approx(float(X[:, 0].var()), abs=0.1)
    single = active_units(guide, X, site="z2", num_runs=1)  # the naive reading
    assert single.variances[1] > 1.0
