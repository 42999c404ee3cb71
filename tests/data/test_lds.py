"""The ``lds`` sequence set: shapes, seeding, the true parameters, and its exact log p(y)
checked against the dense Gaussian of the whole observed sequence."""

import pytest
import torch

from pvae import data


def _dense_log_likelihood(ds, split: str) -> torch.Tensor:
    """log N(y_obs; 0, Cov(y_obs)) with the covariance of the stacked states built densely."""
    info = ds.info
    A, Q = info["transition_matrix"], info["transition_cov"]
    H, R = info["observation_matrix"], info["observation_cov"]
    P1 = info["initial_cov"]
    values, _, mask = getattr(ds, split)
    T, D, M = ds.num_steps, A.shape[0], H.shape[0]
    # Cov(x_s, x_t) = A^{s-t} Var(x_t) for s >= t
    variances = [P1]
    for _ in range(1, T):
        variances.append(A @ variances[-1] @ A.T + Q)
    cov = torch.zeros(T * D, T * D, dtype=torch.float64)
    for t in range(T):
        block = variances[t]
        for s in range(t, T):
            cov[s * D : (s + 1) * D, t * D : (t + 1) * D] = block
            cov[t * D : (t + 1) * D, s * D : (s + 1) * D] = block.T
            block = A @ block
    big_H = torch.block_diag(*([H] * T))
    y_cov = big_H @ cov @ big_H.T + torch.block_diag(*([R] * T))
    out = []
    for y, m in zip(values.double(), mask, strict=True):
        keep = m.repeat_interleave(M)
        normal = torch.distributions.MultivariateNormal(
            torch.zeros(int(keep.sum()), dtype=torch.float64), y_cov[keep][:, keep]
        )
        out.append(normal.log_prob(y.reshape(-1)[keep]))
    return torch.stack(out)


@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_exact_log_likelihood_matches_dense_gaussian(missing):
    ds = data.load("lds", sizes=(3, 2, 4), num_steps=12, state_dim=3, obs_dim=2, missing=missing)
    exact = data.lds_log_likelihood(ds, "test")
    assert exact.shape == (4,) and exact.dtype == torch.float64
    torch.testing.assert_close(exact, _dense_log_likelihood(ds, "test"), atol=1e-8, rtol=1e-10)


def test_shapes_truth_and_seeding():
    ds = data.load("lds", sizes=(5, 2, 3), num_steps=20, seed=3)
    values, times, mask = ds.train
    assert values.shape == (5, 20, 4) and times.shape == (5, 20) and mask.all()
    assert ds.likelihood == "gaussian" and ds.num_steps == 20
    assert ds.truth["train"]["states"].shape == (5, 20, 2)
    assert ds.info["transition_matrix"].shape == (2, 2)
    # the observations are H x + noise: the residual has the noise's scale
    H = ds.info["observation_matrix"].float()
    residual = values - ds.truth["train"]["states"] @ H.T
    assert abs(float(residual.std()) - ds.info["noise"]) < 0.05
    again = data.load("lds", sizes=(5, 2, 3), num_steps=20, seed=3)
    assert torch.equal(again.train.values, values)
    assert not torch.equal(
        data.load("lds", sizes=(5, 2, 3), num_steps=20, seed=4).train.values, values
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="state_dim"):
        data.load("lds", sizes=(2, 1, 1), state_dim=0)
    with pytest.raises(ValueError, match="noise"):
        data.load("lds", sizes=(2, 1, 1), noise=0.0)
    with pytest.raises(TypeError, match="lds"):
        data.lds_log_likelihood(data.load("pendulum", sizes=(1, 1, 1), num_steps=3))
