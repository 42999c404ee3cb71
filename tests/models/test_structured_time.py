"""StructuredVAE in continuous time (issue 19): the exact discretisation (A_k, Q_k) against a
fine-step Euler integration and the Lyapunov closed form, the bound against a dense Gaussian
log p(y) on an irregular grid, a t^2 grid modelled as such, a regular grid shared by every
step, and (A, Q) set from a discrete-time pair."""

import math

import pyro
import pytest
import torch

from pvae import gp
from pvae.inference import ELBO, IWAE, KalmanELBO
from pvae.models import StructuredVAE

D = 3


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def _drift_and_diffusion() -> tuple[torch.Tensor, torch.Tensor]:
    """A stable, non-normal, rotating F and a full Sigma, float64."""
    g = torch.Generator().manual_seed(3)
    F = 0.5 * torch.randn(D, D, generator=g, dtype=torch.float64) - 0.6 * torch.eye(
        D, dtype=torch.float64
    )
    L = torch.randn(D, D, generator=g, dtype=torch.float64)
    return F, L @ L.T + 0.1 * torch.eye(D, dtype=torch.float64)


def _stationary_cov(F: torch.Tensor, Sigma: torch.Tensor) -> torch.Tensor:
    """P_inf solving F P + P F^T + Sigma = 0 (a Kronecker-form linear solve)."""
    eye = torch.eye(F.shape[-1], dtype=F.dtype)
    kron_sum = torch.kron(F, eye) + torch.kron(eye, F)
    return torch.linalg.solve(kron_sum, -Sigma.reshape(-1)).reshape(F.shape)


def _euler(F, Sigma, dt, steps):
    """dA/ds = F A, dQ/ds = F Q + Q F^T + Sigma from (I, 0), ``steps`` Euler steps to dt."""
    h = dt / steps
    A, Q = torch.eye(D, dtype=F.dtype), torch.zeros(D, D, dtype=F.dtype)
    for _ in range(steps):
        A, Q = A + h * (F @ A), Q + h * (F @ Q + Q @ F.T + Sigma)
    return A, Q


def test_discretisation_matches_euler_and_the_lyapunov_form():
    F, Sigma = _drift_and_diffusion()
    gaps = torch.tensor([1e-3, 0.3, 1.0, 7.0, 60.0], dtype=torch.float64)
    A, Q = gp.lti_discretisation(F, Sigma, gaps)
    assert A.shape == Q.shape == (5, D, D)
    # closed form: A = expm(F dt), Q = P_inf - A P_inf A^T (exact in float64 for these gaps)
    P = _stationary_cov(F, Sigma)
    for k, dt in enumerate(gaps.tolist()):
        exact = torch.linalg.matrix_exp(F * dt)
        torch.testing.assert_close(A[k], exact, rtol=0, atol=1e-12)
        torch.testing.assert_close(Q[k], P - exact @ P @ exact.T, rtol=1e-10, atol=1e-13)
    # an independent integration: Euler with 2000 and 4000 steps, Richardson-extrapolated
    # (error O(h^2) ~ 1e-7 here; the tolerance is 10x that)
    for k in (1, 2):
        dt = float(gaps[k])
        coarse, fine = _euler(F, Sigma, dt, 2000), _euler(F, Sigma, dt, 4000)
        A_ref, Q_ref = (2 * f - c for f, c in zip(fine, coarse, strict=True))
        torch.testing.assert_close(A[k], A_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(Q[k], Q_ref, rtol=0, atol=1e-6)
    # float32 keeps ~1e-5 relative accuracy even for the 60-unit gap (PSD doublings)
    A32, Q32 = gp.lti_discretisation(F.float(), Sigma.float(), gaps.float())
    relative = (Q32.double() - Q).abs().amax((-2, -1)) / Q.abs().amax((-2, -1))
    assert float(relative.max()) < 1e-4


def _linear_model(times_scale: float = 1.0) -> StructuredVAE:
    """Linear-Gaussian decoder, exact potentials, a rotating contracting F and full Sigma."""
    model = StructuredVAE(
        x_dim=4,
        z_dim=2,
        likelihood="gaussian",
        net="linear",
        exact_potentials=True,
        time_scale=times_scale,
    ).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.dynamics.generator_raw.copy_(torch.tensor([[-0.15, -0.8], [0.7, -0.3]]))
        model.dynamics.diffusion_raw.copy_(torch.tensor([[0.2, 0.0], [0.3, -0.5]]))
        model.dynamics.initial_loc.copy_(torch.tensor([0.5, -1.0]))
        model.dynamics.initial_raw.copy_(torch.tensor([[0.4, 0.0], [0.2, 0.1]]))
        model.decoder.weight.copy_(torch.randn(4, 2, generator=g, dtype=torch.float64))
        model.decoder.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
        model.likelihood.log_scale.fill_(math.log(0.4))
    return model


def _dense_log_marginal(model: StructuredVAE, y, times, mask) -> torch.Tensor:
    """log p(y_observed) of one sequence from the dense joint Gaussian of the frames.

    Cov(z(t_i), z(t_j)) = expm(F (t_i - t_j)) P(t_j) for i >= j, P(t) = expm(F u) P_1
    expm(F u)^T + P_inf - expm(F u) P_inf expm(F u)^T with u = t - t_1 (whole elapsed times,
    no per-gap composition); y = C z + d + noise.
    """
    dyn = model.dynamics
    with torch.no_grad():
        F, Sigma = dyn.generator(), dyn.diffusion_cov()
        P1, m1 = dyn.initial_cov(), dyn.initial_loc.detach()
        C, d = model.decoder.weight, model.decoder.bias
        R = torch.diag(model.likelihood.scale.expand(4).pow(2))
    P_inf = _stationary_cov(F, Sigma)
    T = times.shape[0]
    elapsed = (times - times[0]) / dyn.time_scale
    E = torch.linalg.matrix_exp(F * elapsed[:, None, None])
    marg = E @ P1 @ E.mT + P_inf - E @ P_inf @ E.mT
    means = E @ m1
    K = torch.zeros(T * 2, T * 2, dtype=torch.float64)
    for i in range(T):
        for j in range(i + 1):
            block = torch.linalg.matrix_exp(F * (elapsed[i] - elapsed[j])) @ marg[j]
            K[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = block
            K[2 * j : 2 * j + 2, 2 * i : 2 * i + 2] = block.T
    big_C = torch.block_diag(*[C] * T)
    cov = big_C @ K @ big_C.T + torch.block_diag(*[R] * T)
    mean = (means @ C.T + d).reshape(-1)
    keep = mask.repeat_interleave(4)
    normal = torch.distributions.MultivariateNormal(mean[keep], cov[keep][:, keep])
    return normal.log_prob(y.reshape(-1)[keep])


def test_bound_equals_the_dense_gaussian_log_marginal_on_an_irregular_grid():
    """Exact potentials: KalmanELBO, IWAE and the Monte-Carlo ELBO all equal log p(y) (the
    guide is the exact posterior, log w is constant), checked against the dense joint
    Gaussian of the frames on a t^2 grid with hidden frames, float64, to 1e-8 nats."""
    model = _linear_model(times_scale=0.7)
    g = torch.Generator().manual_seed(0)
    B, T = 3, 9
    times = (torch.arange(T, dtype=torch.float64) * 0.6) ** 2
    times = torch.stack([times, times * 1.5 + 0.2, times + torch.linspace(0, 0.5, T)])
    values = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    truth = sum(float(_dense_log_marginal(model, values[b], times[b], mask[b])) for b in range(B))
    for engine in (KalmanELBO(), ELBO(analytic_kl=False), IWAE(num_particles=3)):
        bound = -engine.loss(model.model, model.guide, values, times, mask)
        assert bound == pytest.approx(truth, abs=1e-8), type(engine).__name__


def test_an_irregular_grid_is_modelled_as_such():
    """The same frames on 0..T-1 and on (0..T-1)^2 / (T-1) (same span) get different bounds;
    ten times denser stamps with time_scale 0.1 give the unit grid's bound exactly."""
    model = _linear_model()
    g = torch.Generator().manual_seed(0)
    T = 12
    values = torch.randn(2, T, 4, generator=g, dtype=torch.float64)
    regular = torch.arange(T, dtype=torch.float64)
    squared = regular**2 / (T - 1)
    engine = KalmanELBO()
    bound_regular = -engine.loss(model.model, model.guide, values, regular.expand(2, T), None)
    bound_squared = -engine.loss(model.model, model.guide, values, squared.expand(2, T), None)
    assert abs(bound_regular - bound_squared) > 1.0, (bound_regular, bound_squared)
    # times=None is the regular grid time_scale apart
    assert -engine.loss(model.model, model.guide, values, None, None) == pytest.approx(
        bound_regular, abs=1e-10
    )
    fast = _linear_model(times_scale=0.1)
    bound_fast = -engine.loss(fast.model, fast.guide, values, regular.expand(2, T) * 0.1, None)
    assert bound_fast == pytest.approx(bound_regular, abs=1e-8)


def test_a_regular_grid_shares_one_transition_and_agrees_with_per_step_ones():
    model = _linear_model()
    T = 6
    times = torch.arange(T, dtype=torch.float64) * 0.5
    x = torch.zeros(2, T, 4, dtype=torch.float64)
    _, _, gaps = model._check(x, None, times.expand(2, T))
    assert gaps.shape == (1,)  # one (A, Q) computed for all steps and sequences
    shared = model.prior(T, gaps)
    per_step = model.prior(T, torch.full((T - 1,), 0.5, dtype=torch.float64))
    assert shared.transition_matrix.shape[-3] == 1
    z = shared.sample(torch.Size([4]))
    torch.testing.assert_close(shared.log_prob(z), per_step.log_prob(z), rtol=0, atol=1e-10)
    # distinct per-sequence stamps: one (T-1) grid per sequence, batch shape (B,)
    uneven = torch.stack([times, times**1.5])
    _, _, gaps = model._check(x, None, uneven)
    assert gaps.shape == (2, T - 1)
    assert model.prior(T, gaps).batch_shape == (2,)


def test_set_transition_reproduces_a_discrete_time_pair_and_refuses_what_it_cannot():
    model = StructuredVAE(x_dim=4, z_dim=2, likelihood="gaussian", net="linear").double()
    angle = 0.4
    rotation = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
        dtype=torch.float64,
    )
    A, Q = 0.9 * rotation, torch.tensor([[0.05, 0.01], [0.01, 0.03]], dtype=torch.float64)
    model.dynamics.set_transition(A, Q)
    torch.testing.assert_close(model.dynamics.transition_matrix(), A, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.dynamics.transition_cov(), Q, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="negative real axis"):
        model.dynamics.set_transition(-0.5 * torch.eye(2, dtype=torch.float64), Q)
    with pytest.raises(ValueError, match="contraction"):
        model.dynamics.set_transition(1.01 * torch.eye(2, dtype=torch.float64), Q)


def test_initialisation_is_the_former_discrete_time_one_over_one_time_scale():
    model = StructuredVAE(x_dim=4, z_dim=3, hidden=(8,), time_scale=0.1)
    with torch.no_grad():
        A, Q = model.dynamics.transition_matrix(), model.dynamics.transition_cov()
    torch.testing.assert_close(A, 0.95 * torch.eye(3))
    torch.testing.assert_close(Q, 0.1 * torch.eye(3), rtol=1e-3, atol=0)  # 1e-4 floor on L
    assert torch.linalg.matrix_norm(model.dynamics.transition_matrix(5.0), ord=2) < 1


@pytest.mark.parametrize("z_dim", [4, 5])
def test_rotation_initialisation_is_rotations_with_unit_stationary_covariance(z_dim):
    """dynamics_init="rotation": over one time_scale, A has 2x2 blocks of modulus 0.99 turning
    by pi/6 and pi/3 (spread_angles(2)), the coordinate left over (z_dim 5) decays by 0.95,
    and Q = I - A A^T, so the stationary covariance (the solution S of S = A S A^T + Q) is I;
    over half a time_scale the turn is half as large (A is expm(F t))."""
    model = StructuredVAE(
        x_dim=4, z_dim=z_dim, hidden=(8,), time_scale=0.1, dynamics_init="rotation"
    ).double()
    with torch.no_grad():
        A, Q = model.dynamics.transition_matrix(), model.dynamics.transition_cov()
        half = model.dynamics.transition_matrix(0.05)
    eye = torch.eye(z_dim, dtype=torch.float64)
    for k, angle in enumerate((math.pi / 6, math.pi / 3)):
        c, s = 0.99 * math.cos(angle), 0.99 * math.sin(angle)
        block = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        torch.testing.assert_close(
            A[2 * k : 2 * k + 2, 2 * k : 2 * k + 2], block, atol=1e-6, rtol=0
        )
        angles = torch.linalg.eigvals(half[2 * k : 2 * k + 2, 2 * k : 2 * k + 2]).angle()
        torch.testing.assert_close(
            angles.abs(), torch.full((2,), angle / 2, dtype=torch.float64), atol=1e-6, rtol=0
        )
    if z_dim == 5:
        torch.testing.assert_close(
            A[4, 4], torch.tensor(0.95, dtype=torch.float64), atol=1e-6, rtol=0
        )
    off_blocks = A.clone()
    off_blocks[:2, :2] = off_blocks[2:4, 2:4] = 0
    off_blocks[4:, 4:] = 0
    assert float(off_blocks.abs().max()) < 1e-6
    # 1e-6: the parameters were set in float32 at construction (then cast to float64)
    torch.testing.assert_close(A @ A.mT + Q, eye, rtol=0, atol=1e-6)


def test_set_rotations_checks_its_arguments():
    model = StructuredVAE(x_dim=4, z_dim=4, hidden=(8,))
    model.dynamics.set_rotations([0.3], radius=0.9)
    eigenvalues = torch.linalg.eigvals(model.dynamics.transition_matrix().detach().double())
    torch.testing.assert_close(
        eigenvalues.abs().sort().values,
        torch.tensor([0.9, 0.9, 0.95, 0.95], dtype=torch.float64),
        rtol=0,
        atol=1e-5,
    )
    for bad_angles in ([], [0.3, 0.3, 0.3], [0.0], [math.pi], [float("nan")]):
        with pytest.raises(ValueError, match="angles"):
            model.dynamics.set_rotations(bad_angles)
    for bad_radius in (0.0, 1.0, 0.9995):
        with pytest.raises(ValueError, match="radius"):
            model.dynamics.set_rotations([0.3], radius=bad_radius)
    with pytest.raises(ValueError, match="dynamics_init"):
        StructuredVAE(x_dim=4, z_dim=4, dynamics_init="rotations")


def test_time_scale_is_checked():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="time_scale"):
            StructuredVAE(x_dim=4, z_dim=2, time_scale=bad)


def test_conveniences_without_times_assume_frames_time_scale_apart():
    model = StructuredVAE(x_dim=4, z_dim=2, hidden=(8,), likelihood="gaussian", time_scale=0.1)
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 7, 4, generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.3
    grid = torch.arange(7.0) * 0.1
    torch.testing.assert_close(model.impute(values, mask), model.impute(values, mask, grid))
    stretched = model.impute(values, mask, grid * 10)
    assert not torch.allclose(stretched[~mask], model.impute(values, mask)[~mask])
    torch.testing.assert_close(
        model.forecast(values, 3, mask), model.forecast(values, 3, mask, grid, gap=0.1)
    )
