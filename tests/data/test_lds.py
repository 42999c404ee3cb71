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
    # the observations are H x + noise: the residual has the noise's scale r. On 60 sequences
    # (n = 4,800 residuals) the sample sd has standard error r / sqrt(2 n); band 5 SE (5.1% of
    # r), so a 20% error in r lies 19 SE away.
    big = data.load("lds", sizes=(60, 1, 1), num_steps=20, seed=3)
    H = big.info["observation_matrix"].float()
    residual = big.train.values - big.truth["train"]["states"] @ H.T
    noise = big.info["noise"]
    assert abs(float(residual.std()) - noise) < 5 * noise / (2 * residual.numel()) ** 0.5
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


def _covariance_band(cov: torch.Tensor, n: int) -> torch.Tensor:
    """Standard error of each entry of a sample covariance of n Gaussian draws:
    sqrt((S_ii S_jj + S_ij^2) / n)."""
    diag = cov.diagonal()
    return ((diag[:, None] * diag[None, :] + cov**2) / n).sqrt()


def test_recorded_parameters_generate_the_data():
    # The recorded A, Q, initial covariance, H and R are fitted back from many generated
    # sequences, at a decay (0.5) and an odd state size (3) where a transposed A, a missing
    # decay or a Q of the wrong scale would show. Each entry must lie within 5 standard errors
    # of its estimator (n draws per estimate; a wrong convention moves entries by >> 5 SE).
    n, T = 4000, 4
    ds = data.load(
        "lds",
        sizes=(n, 1, 1),
        num_steps=T,
        state_dim=3,
        obs_dim=4,
        decay=0.5,
        rotation=0.7,
        transition_noise=0.6,
        noise=0.4,
        seed=11,
    )
    info = ds.info
    A, Q = info["transition_matrix"], info["transition_cov"]
    H, R, P1 = info["observation_matrix"], info["observation_cov"], info["initial_cov"]
    assert not torch.allclose(A, A.T)  # a rotation: A and A^T differ, so a transpose shows
    x = ds.truth["train"]["states"].double()  # (n, T, D)
    y = ds.train.values.double()
    # initial state: x_1 ~ N(initial_loc, initial_cov)
    x1 = x[:, 0]
    assert (x1.mean(0) - info["initial_loc"]).abs().max() < 5 * (P1.diagonal() / n).sqrt().max()
    S1 = torch.cov(x1.T)
    assert ((S1 - P1).abs() <= 5 * _covariance_band(P1, n)).all()
    # transition: least squares of x_{t+1} on x_t over all steps; residual covariance = Q
    past, future = x[:, :-1].reshape(-1, 3), x[:, 1:].reshape(-1, 3)
    A_hat = torch.linalg.lstsq(past, future).solution.T
    m = past.shape[0]
    A_se = (Q.diagonal()[:, None] / (past.T @ past).diagonal()[None, :]).sqrt()
    assert ((A_hat - A).abs() <= 5 * A_se).all(), (A_hat, A)
    residual = future - past @ A.T
    assert ((torch.cov(residual.T) - Q).abs() <= 5 * _covariance_band(Q, m)).all()
    # observation: y_t = H x_t + r_t, r_t ~ N(0, R)
    noise = (y - x @ H.T).reshape(-1, 4)
    assert ((torch.cov(noise.T) - R).abs() <= 5 * _covariance_band(R, noise.shape[0])).all()
    # and from the observations alone: Cov(y_1) = H P1 H^T + R, Cov(y_2, y_1) = H A P1 H^T
    y1, y2 = y[:, 0], y[:, 1]
    cov_y1 = H @ P1 @ H.T + R
    assert ((torch.cov(y1.T) - cov_y1).abs() <= 5 * _covariance_band(cov_y1, n)).all()
    cross = (y2 - y2.mean(0)).T @ (y1 - y1.mean(0)) / (n - 1)
    cov_y2 = H @ (A @ P1 @ A.T + Q) @ H.T + R
    band = (cov_y2.diagonal()[:, None] * cov_y1.diagonal()[None, :] / n).sqrt()
    assert ((cross - H @ A @ P1 @ H.T).abs() <= 5 * band).all()
