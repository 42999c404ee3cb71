"""pvae.ssm against dense Gaussian conditioning on the stacked sequence (float64, 1e-8)."""

from __future__ import annotations

import math

import pytest
import torch

from pvae.ssm import (
    diagonal_potentials,
    expected_log_potentials,
    kalman_smoother,
    posterior_prior_kl,
)
from tests.mc_bands import assert_gaussian_moments

METHODS = ["sequential", "parallel"]


def random_spd(*shape, dim, generator, scale=1.0):
    a = torch.randn(*shape, dim, dim, dtype=torch.float64, generator=generator)
    return scale * (a @ a.mT / dim + 0.3 * torch.eye(dim, dtype=torch.float64))


def make_problem(T=7, D=3, M=2, batch=(2,), seed=0, time_varying=True, per_step_obs=True):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    A = 0.6 * torch.randn(*((T - 1,) if time_varying else ()), D, D, dtype=f64, generator=g)
    Q = random_spd(*((T - 1,) if time_varying else ()), dim=D, generator=g, scale=0.5)
    if per_step_obs:
        H = torch.randn(*batch, T, M, D, dtype=f64, generator=g)
        R = random_spd(*batch, T, dim=M, generator=g, scale=0.3)
    else:
        H = torch.randn(M, D, dtype=f64, generator=g)
        R = random_spd(dim=M, generator=g, scale=0.3)
    m1 = torch.randn(*batch, D, dtype=f64, generator=g)
    P1 = random_spd(dim=D, generator=g)
    y = torch.randn(*batch, T, M, dtype=f64, generator=g)
    mask = torch.rand(*batch, T, generator=g) > 0.35
    mask[..., 0] = False  # a missing first step
    mask[..., -1] = True
    return dict(
        y=y,
        transition_matrix=A,
        transition_cov=Q,
        observation_matrix=H,
        observation_cov=R,
        initial_loc=m1,
        initial_cov=P1,
        mask=mask,
    )


def _step_matrix(value, t, T_index_dims=3):
    return value[t] if value.dim() >= T_index_dims else value


def dense_prior(A, Q, m1, P1, T):
    """Mean (T*D,) and covariance of the stacked state (x_1, ..., x_T) for one sequence."""
    D = m1.shape[-1]
    G = torch.eye(T * D, dtype=m1.dtype)
    for t in range(1, T):
        G[t * D : (t + 1) * D, (t - 1) * D : t * D] = -_step_matrix(A, t - 1)
    Ginv = torch.linalg.inv(G)
    u_mean = torch.cat([m1, torch.zeros((T - 1) * D, dtype=m1.dtype)])
    u_cov = torch.block_diag(P1, *[_step_matrix(Q, t) for t in range(T - 1)])
    return Ginv @ u_mean, Ginv @ u_cov @ Ginv.T


def dense_condition(mu, Sigma, H, R, y, mask, upto, D):
    """log p(y_obs<=upto), posterior mean and covariance given the observed steps <= upto."""
    rows_H, rows_R, ys = [], [], []
    T = y.shape[0]
    for t in range(T):
        if t <= upto and bool(mask[t]):
            Ht = _step_matrix(H, t)
            block = torch.zeros(Ht.shape[0], T * D, dtype=mu.dtype)
            block[:, t * D : (t + 1) * D] = Ht
            rows_H.append(block)
            rows_R.append(_step_matrix(R, t))
            ys.append(y[t])
    if not rows_H:
        return torch.zeros((), dtype=mu.dtype), mu, Sigma
    Hs, Rs, ys = torch.cat(rows_H), torch.block_diag(*rows_R), torch.cat(ys)
    S = Hs @ Sigma @ Hs.T + Rs
    log_z = torch.distributions.MultivariateNormal(Hs @ mu, S).log_prob(ys)
    K = Sigma @ Hs.T @ torch.linalg.inv(S)
    return log_z, mu + K @ (ys - Hs @ mu), Sigma - K @ S @ K.T


def dense_reference(problem, b):
    """Everything kalman_smoother returns, for batch element b, by dense conditioning."""
    p = problem
    y, mask = p["y"][b], p["mask"][b]
    T, D = y.shape[0], p["initial_loc"].shape[-1]
    H = (
        p["observation_matrix"][b]
        if p["observation_matrix"].dim() == 4
        else p["observation_matrix"]
    )
    R = p["observation_cov"][b] if p["observation_cov"].dim() == 4 else p["observation_cov"]
    mu, Sigma = dense_prior(
        p["transition_matrix"], p["transition_cov"], p["initial_loc"][b], p["initial_cov"], T
    )
    filtered_means, filtered_covs = [], []
    for t in range(T):
        _, m, S = dense_condition(mu, Sigma, H, R, y, mask, t, D)
        filtered_means.append(m[t * D : (t + 1) * D])
        filtered_covs.append(S[t * D : (t + 1) * D, t * D : (t + 1) * D])
    log_z, m, S = dense_condition(mu, Sigma, H, R, y, mask, T, D)
    blocks = [slice(t * D, (t + 1) * D) for t in range(T)]
    return dict(
        log_normalizer=log_z,
        filtered_means=torch.stack(filtered_means),
        filtered_covs=torch.stack(filtered_covs),
        smoothed_means=m.reshape(T, D),
        smoothed_covs=torch.stack([S[i, i] for i in blocks]),
        smoothed_cross_covs=torch.stack([S[blocks[t + 1], blocks[t]] for t in range(T - 1)]),
        joint_mean=m,
        joint_cov=S,
    )


FIELDS = [
    "log_normalizer",
    "filtered_means",
    "filtered_covs",
    "smoothed_means",
    "smoothed_covs",
    "smoothed_cross_covs",
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("time_varying,per_step_obs", [(True, True), (False, False), (True, False)])
def test_against_dense_conditioning(method, time_varying, per_step_obs):
    problem = make_problem(time_varying=time_varying, per_step_obs=per_step_obs)
    result = kalman_smoother(**problem, method=method)
    assert result.log_normalizer.shape == (2,)
    assert result.smoothed_covs.shape == (2, 7, 3, 3)
    assert result.smoothed_cross_covs.shape == (2, 6, 3, 3)
    for b in range(2):
        truth = dense_reference(problem, b)
        for field in FIELDS:
            torch.testing.assert_close(
                getattr(result, field)[b], truth[field], atol=1e-8, rtol=1e-8, msg=field
            )


@pytest.mark.parametrize("T", [1, 2, 5, 16, 33])
def test_parallel_equals_sequential(T):
    problem = make_problem(T=T, D=2, M=2, batch=(3, 2), seed=T)
    seq = kalman_smoother(**problem, method="sequential")
    par = kalman_smoother(**problem, method="parallel")
    for field in FIELDS + ["backward_gains", "backward_offsets", "backward_covs"]:
        torch.testing.assert_close(
            getattr(par, field), getattr(seq, field), atol=1e-9, rtol=1e-9, msg=field
        )


def test_no_mask_equals_all_observed_and_nan_at_missing_steps():
    problem = make_problem()
    full = dict(problem, mask=None)
    a = kalman_smoother(**full)
    b = kalman_smoother(**dict(problem, mask=torch.ones_like(problem["mask"])))
    torch.testing.assert_close(a.log_normalizer, b.log_normalizer)
    # a missing step contributes nothing, whatever y holds there (NaN included)
    y = problem["y"].clone()
    y[~problem["mask"]] = float("nan")
    y.requires_grad_(True)
    c = kalman_smoother(**dict(problem, y=y))
    d = kalman_smoother(**problem)
    torch.testing.assert_close(c.log_normalizer, d.log_normalizer)
    c.log_normalizer.sum().backward()
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("method", METHODS)
def test_sample_moments(method):
    """Joint sample mean and covariance of 40k draws match the dense posterior, every entry
    within 5 standard errors of its estimator (Gaussian sampling variances from the dense
    truth); 40k draws put a 20% error in any variance at least 4 bands (28 SE) away."""
    problem = make_problem(T=4, D=2, M=2, batch=(2,), seed=3)
    result = kalman_smoother(**problem, method=method)
    torch.manual_seed(0)
    draws = result.sample(40000)
    assert draws.shape == (40000, 2, 4, 2)
    truth = dense_reference(problem, 1)
    flat = draws[:, 1].reshape(40000, -1)
    assert_gaussian_moments(flat, truth["joint_mean"], truth["joint_cov"])  # 5 SE


@pytest.mark.parametrize("method", METHODS)
def test_sampling_is_the_exact_affine_map(method):
    """The reparameterised draw is mean + chol(joint cov) noise for some triangular factor:
    its Jacobian in the noise reproduces the dense posterior covariance (to 1e-8)."""
    problem = make_problem(T=4, D=2, M=2, batch=(1,), seed=5)
    result = kalman_smoother(**problem, method=method)
    zero = result.transform_noise(torch.zeros(1, 4, 2, dtype=torch.float64))
    truth = dense_reference(problem, 0)
    torch.testing.assert_close(zero.reshape(-1), truth["joint_mean"], atol=1e-8, rtol=1e-8)
    jac = torch.autograd.functional.jacobian(
        lambda e: result.transform_noise(e.reshape(1, 4, 2)).reshape(-1),
        torch.zeros(8, dtype=torch.float64),
    )
    torch.testing.assert_close(jac @ jac.T, truth["joint_cov"], atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_against_finite_differences(method):
    problem = make_problem(T=4, D=2, M=2, batch=(2,), seed=7)
    names = [k for k in problem if k != "mask"]

    def loss(*args):
        kwargs = dict(zip(names, args, strict=True))
        # symmetric inputs: differentiate through the symmetrised covariances
        for key in ("transition_cov", "observation_cov", "initial_cov"):
            kwargs[key] = 0.5 * (kwargs[key] + kwargs[key].mT)
        r = kalman_smoother(**kwargs, mask=problem["mask"], method=method)
        return (
            r.log_normalizer.sum()
            + r.smoothed_means.pow(2).sum()
            + r.smoothed_covs.sum()
            + r.smoothed_cross_covs.sum()
        )

    inputs = tuple(problem[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)


def test_float32_close_to_float64():
    problem = make_problem(T=20, D=3, M=2, batch=(2,), seed=11)
    r64 = kalman_smoother(**problem, method="parallel")
    p32 = {k: (v.float() if v.dtype == torch.float64 else v) for k, v in problem.items()}
    for method in METHODS:
        r32 = kalman_smoother(**p32, method=method)
        assert r32.smoothed_covs.dtype == torch.float32
        torch.testing.assert_close(
            r32.log_normalizer.double(), r64.log_normalizer, atol=1e-3, rtol=1e-4
        )
        torch.testing.assert_close(
            r32.smoothed_means.double(), r64.smoothed_means, atol=1e-3, rtol=1e-3
        )


def test_long_sequence_stays_finite_float32():
    """A stable rotation observed through one noisy coordinate, 2000 steps, float32."""
    angle = 0.1
    A = 0.999 * torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    Q, H, R = 1e-4 * torch.eye(2), torch.tensor([[1.0, 0.0]]), torch.tensor([[1e-2]])
    y = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        r = kalman_smoother(y, A, Q, H, R, torch.zeros(2), torch.eye(2), method=method)
        assert torch.isfinite(r.log_normalizer)
        eig = torch.linalg.eigvalsh(r.smoothed_covs)
        assert (eig > -1e-6).all()


def test_kl_against_dense_gaussian_kl():
    problem = make_problem(T=5, D=2, M=2, batch=(2,), seed=13)
    result = kalman_smoother(**problem)
    kl = posterior_prior_kl(
        result,
        problem["y"],
        problem["observation_matrix"],
        problem["observation_cov"],
        problem["mask"],
    )
    for b in range(2):
        truth = dense_reference(problem, b)
        mu, Sigma = dense_prior(
            problem["transition_matrix"],
            problem["transition_cov"],
            problem["initial_loc"][b],
            problem["initial_cov"],
            5,
        )
        dense = torch.distributions.kl_divergence(
            torch.distributions.MultivariateNormal(truth["joint_mean"], truth["joint_cov"]),
            torch.distributions.MultivariateNormal(mu, Sigma),
        )
        torch.testing.assert_close(kl[b], dense, atol=1e-8, rtol=1e-8)


def test_diagonal_potentials():
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(3, 6, 2, dtype=torch.float64, generator=g)
    scale = torch.rand(3, 6, 2, dtype=torch.float64, generator=g) + 0.5
    y, H, R = diagonal_potentials(loc, scale)
    assert H.shape == (2, 2) and R.shape == (3, 6, 2, 2)
    A, Q = 0.9 * torch.eye(2, dtype=torch.float64), 0.2 * torch.eye(2, dtype=torch.float64)
    r = kalman_smoother(y, A, Q, H, R, torch.zeros(2, dtype=torch.float64), torch.eye(2).double())
    # independent coordinates: equal to two scalar smoothers
    for i in range(2):
        ri = kalman_smoother(
            loc[..., i : i + 1],
            A[:1, :1],
            Q[:1, :1],
            torch.ones(1, 1, dtype=torch.float64),
            scale[..., i : i + 1].pow(2).unsqueeze(-1),
            torch.zeros(1, dtype=torch.float64),
            torch.ones(1, 1, dtype=torch.float64),
        )
        torch.testing.assert_close(r.smoothed_means[..., i], ri.smoothed_means[..., 0])
    e = expected_log_potentials(r, y, H, R)
    assert e.shape == (3,)


def test_bad_inputs_raise():
    p = make_problem()
    with pytest.raises(ValueError, match="method"):
        kalman_smoother(**p, method="fast")
    with pytest.raises(ValueError, match="transition_matrix"):
        kalman_smoother(**dict(p, transition_matrix=torch.zeros(4, 3, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="observation_cov"):
        kalman_smoother(**dict(p, observation_cov=torch.eye(3, dtype=torch.float64)))
    with pytest.raises(TypeError, match="mask"):
        kalman_smoother(**dict(p, mask=p["mask"].float()))
    with pytest.raises(ValueError, match="mask"):
        kalman_smoother(**dict(p, mask=p["mask"][..., :3]))
    with pytest.raises(ValueError, match="broadcast"):
        kalman_smoother(**dict(p, initial_loc=torch.zeros(5, 3, dtype=torch.float64)))


def shared_problem(T=6, D=3, M=2, batch=4, seed=17, dtype=torch.float64):
    """One time-invariant model (unbatched matrices) for a batch of sequences."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        y=torch.randn(batch, T, M, dtype=dtype, generator=g),
        transition_matrix=0.7 * torch.randn(D, D, dtype=dtype, generator=g),
        transition_cov=random_spd(dim=D, generator=g, scale=0.5).to(dtype),
        observation_matrix=torch.randn(M, D, dtype=dtype, generator=g),
        observation_cov=random_spd(dim=M, generator=g, scale=0.3).to(dtype),
        initial_loc=torch.randn(D, dtype=dtype, generator=g),
        initial_cov=random_spd(dim=D, generator=g).to(dtype),
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("masked", [False, True])
def test_shared_model_equals_the_same_model_given_per_step(method, masked):
    """Matrices shared by the batch and the steps (one product for all) give the numbers that
    the same matrices repeated per sequence and per step give (the general batched path)."""
    p = shared_problem()
    batch, T = p["y"].shape[:2]
    if masked:
        p["mask"] = torch.rand(batch, T, generator=torch.Generator().manual_seed(1)) > 0.4
    expanded = dict(
        p,
        transition_matrix=p["transition_matrix"].expand(batch, T - 1, 3, 3),
        transition_cov=p["transition_cov"].expand(batch, T - 1, 3, 3),
        observation_matrix=p["observation_matrix"].expand(batch, T, 2, 3),
        observation_cov=p["observation_cov"].expand(batch, T, 2, 2),
        initial_loc=p["initial_loc"].expand(batch, 3),
        initial_cov=p["initial_cov"].expand(batch, 3, 3),
    )
    shared = kalman_smoother(**p, method=method)
    general = kalman_smoother(**expanded, method=method)
    for field in FIELDS + ["backward_gains", "backward_offsets", "backward_covs"]:
        value = getattr(shared, field)
        assert value.shape == getattr(general, field).shape, field
        torch.testing.assert_close(value, getattr(general, field), atol=1e-10, rtol=1e-10)
    # and the shared model agrees with dense conditioning on one sequence
    b = 2
    dense = dense_reference(
        dict(
            p,
            initial_loc=p["initial_loc"].expand(batch, 3),
            mask=p.get("mask", torch.ones(batch, T, dtype=torch.bool)),
        ),
        b,
    )
    for field in FIELDS:
        torch.testing.assert_close(
            getattr(shared, field)[b], dense[field], atol=1e-8, rtol=1e-8, msg=field
        )


@pytest.mark.parametrize("method", METHODS)
def test_gradients_shared_model(method):
    """Gradcheck through the shared-matrix paths (unbatched parameters, batched data)."""
    p = shared_problem(T=4, D=2, M=2, batch=3, seed=19)
    names = list(p)

    def loss(*args):
        kwargs = dict(zip(names, args, strict=True))
        for key in ("transition_cov", "observation_cov", "initial_cov"):
            kwargs[key] = 0.5 * (kwargs[key] + kwargs[key].mT)
        r = kalman_smoother(**kwargs, method=method)
        return (
            r.log_normalizer.sum()
            + r.smoothed_means.pow(2).sum()
            + r.filtered_covs.sum()
            + r.smoothed_covs.sum()
            + r.smoothed_cross_covs.sum()
        )

    inputs = tuple(p[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)


def _long_problem(T: int, dtype: torch.dtype) -> dict:
    """D=4 state of two slowly decaying rotations, observed through 2 mixed coordinates with
    30% of the steps missing: the regime where a covariance that is not kept symmetric drifts
    (a predicted covariance's asymmetry grows with T in float32 from D=3 on)."""
    g = torch.Generator().manual_seed(T)
    blocks = [
        torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) for a in (0.1, 0.37)
    ]
    A = 0.999 * torch.block_diag(*blocks).double()
    mixing = torch.randn(4, 4, generator=g, dtype=torch.float64)
    A = mixing @ A @ torch.linalg.inv(mixing)  # not block-diagonal, not normal
    Q = random_spd(dim=4, generator=g, scale=1e-3)
    H = torch.randn(2, 4, generator=g, dtype=torch.float64)
    R = random_spd(dim=2, generator=g, scale=1e-2)
    y = torch.randn(T, 2, generator=g, dtype=torch.float64)
    mask = torch.rand(T, generator=g) > 0.3
    problem = dict(
        y=y,
        transition_matrix=A,
        transition_cov=Q,
        observation_matrix=H,
        observation_cov=R,
        initial_loc=torch.zeros(4, dtype=torch.float64),
        initial_cov=torch.eye(4, dtype=torch.float64),
        mask=mask,
    )
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in problem.items()}


@pytest.mark.slow
@pytest.mark.parametrize("T", [1000, 10000])
@pytest.mark.parametrize("method", METHODS)
def test_long_sequences_keep_covariances_symmetric_and_positive(T, method):
    reference = kalman_smoother(**_long_problem(T, torch.float64), method="parallel")
    for dtype in (torch.float64, torch.float32):
        r = kalman_smoother(**_long_problem(T, dtype), method=method)
        assert torch.isfinite(r.log_normalizer), (dtype, method)
        eps = torch.finfo(dtype).eps
        for name in ("filtered_covs", "smoothed_covs"):
            P = getattr(r, name)
            scale = P.abs().amax(dim=(-2, -1), keepdim=True)
            # symmetric to rounding: a few eps of the entries' size, at every step
            assert ((P - P.mT).abs() <= 8 * eps * scale).all(), (name, dtype, method)
            # positive definite: the Cholesky factorisation succeeds at every step
            assert not bool(torch.linalg.cholesky_ex(P.double()).info.any()), (name, dtype)
        # float32 against float64: log Z is a sum of T terms of O(1); rounding grows like
        # sqrt(T) eps per term at worst T eps: 1e-6 relative, 1e-3 relative leaves room
        torch.testing.assert_close(
            r.log_normalizer.double(), reference.log_normalizer, rtol=1e-3, atol=1e-2
        )
