"""pvae.ssm's shortcuts give the numbers of the plain recursions (float64).

- A model shared by all steps, every step observed: the sequential filter stops its covariance
  loop once a step leaves the filtered covariance bitwise unchanged (steady state), and the
  smoother likewise; the same model given once per step takes no shortcut.
- ``method="auto"`` is one of the two methods, chosen by the number of steps (and, above
  :data:`pvae.ssm.AUTO_SEQUENTIAL_SETTLED_FROM` steps, by whether the model is shared).
"""

from __future__ import annotations

import math

import pytest
import torch

from pvae import ssm
from pvae.ssm import kalman_smoother

FIELDS = (
    "log_normalizer",
    "filtered_means",
    "filtered_covs",
    "smoothed_means",
    "smoothed_covs",
    "smoothed_cross_covs",
    "backward_gains",
    "backward_offsets",
    "backward_covs",
)


def rotating_model(T: int, batch: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """D = 4 damped rotations seen through a random 2 x 4 matrix (settles in ~200 steps)."""
    g = torch.Generator().manual_seed(3)
    f64 = torch.float64
    c, s = math.cos(0.2), math.sin(0.2)
    block = torch.tensor([[c, -s], [s, c]], dtype=f64)
    A = 0.95 * torch.block_diag(block, block)
    Q = 0.1 * torch.eye(4, dtype=f64)
    return dict(
        y=torch.randn(*batch, T, 2, dtype=f64, generator=g),
        transition_matrix=A,
        transition_cov=Q,
        observation_matrix=torch.randn(2, 4, dtype=f64, generator=g),
        observation_cov=0.5 * torch.eye(2, dtype=f64),
        initial_loc=torch.randn(4, dtype=f64, generator=g),
        initial_cov=torch.eye(4, dtype=f64),
    )


def per_step(model: dict[str, torch.Tensor], T: int) -> dict[str, torch.Tensor]:
    """The same model with its matrices repeated once per step (no steady-state shortcut)."""
    out = dict(model)
    for name, steps in (("transition_matrix", T - 1), ("transition_cov", T - 1)):
        out[name] = model[name].expand(steps, 4, 4).clone()
    out["observation_matrix"] = model["observation_matrix"].expand(T, 2, 4).clone()
    out["observation_cov"] = model["observation_cov"].expand(T, 2, 2).clone()
    return out


@pytest.mark.parametrize("batch", [(), (3,)])
def test_steady_state_shortcut_equals_the_full_loop(batch):
    T = 400
    model = rotating_model(T, batch)
    inp = ssm._prepare(**model, mask=None)
    steady = ssm._covariance_filter(inp)[3]
    assert 2 < steady < T - 100  # the shortcut is taken, well before the end
    assert ssm._covariance_filter(ssm._prepare(**per_step(model, T), mask=None))[3] == T

    shared = {k: v.clone().requires_grad_(True) for k, v in model.items()}
    full = {k: v.clone().requires_grad_(True) for k, v in per_step(model, T).items()}
    results = []
    for args in (shared, full):
        r = kalman_smoother(**args, method="sequential")
        loss = r.log_normalizer.sum() + r.smoothed_means.sum() + r.smoothed_covs.pow(2).sum()
        loss.backward()
        results.append(r)
    for name in FIELDS:
        a, b = getattr(results[0], name), getattr(results[1], name)
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name
    # gradients of the shared matrices: the per-step ones summed over steps
    for name in ("transition_matrix", "transition_cov", "observation_matrix", "observation_cov"):
        a, b = shared[name].grad, full[name].grad.sum(0)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), name
    for name in ("y", "initial_loc", "initial_cov"):
        assert torch.allclose(shared[name].grad, full[name].grad, rtol=1e-10, atol=1e-10), name


@pytest.mark.parametrize(
    "T",
    [
        5,
        ssm.AUTO_SEQUENTIAL_MAX_STEPS,
        ssm.AUTO_SEQUENTIAL_MAX_STEPS + 1,
        ssm.AUTO_SEQUENTIAL_SETTLED_FROM,
    ],
)
def test_auto_is_one_of_the_methods(T):
    model = rotating_model(T, (2,))
    chosen = "sequential"
    if ssm.AUTO_SEQUENTIAL_MAX_STEPS < T < ssm.AUTO_SEQUENTIAL_SETTLED_FROM:
        chosen = "parallel"
    auto = kalman_smoother(**model, method="auto")
    assert auto.method == chosen
    assert kalman_smoother(**model).method == chosen  # the default
    reference = kalman_smoother(**model, method=chosen)
    for name in FIELDS:
        assert torch.equal(getattr(auto, name), getattr(reference, name)), name


def _loop(E, c, C):
    """The plain recursions ``x_k = E_k x_{k-1} + c_k``, ``X_k = sym(E_k X_{k-1} E_k^T) + C_k``."""
    xs, Xs = [c[0]], [C[0]]
    for k in range(1, c.shape[0]):
        Ek = E[k] if E.shape[0] > 1 else E[0]
        xs.append(ssm._mv(Ek, xs[-1]) + c[k])
        Xs.append(ssm._sym_add(Ek @ Xs[-1] @ Ek.mT, C[k]))
    return torch.stack(xs), torch.stack(torch.broadcast_tensors(*Xs))


@pytest.mark.parametrize("K", [ssm._BLOCKED_FROM, 37, 401])
@pytest.mark.parametrize(
    "E_shape,c_shape,C_shape",
    [
        ((3, 3), (3,), (3, 3)),  # one sequence, a matrix per step
        ((1, 3, 3), (5, 3), (5, 3, 3)),  # one matrix for all steps and the batch
        ((1, 3, 3), (5, 3), (1, 3, 3)),  # per-step matrices shared by the batch
        ((2, 3, 3), (2, 3), (2, 3, 3)),  # a matrix per step and sequence
    ],
)
def test_blocked_recursion_equals_the_loop(K, E_shape, c_shape, C_shape):
    """The blockwise evaluation regroups the loop's sums: values and gradients equal the
    plain loop's to rounding (1e-12), whatever the block split (K = b n, padded, ...)."""
    g = torch.Generator().manual_seed(K)
    f64 = torch.float64
    steps = 1 if E_shape[0] == 1 and len(E_shape) == 3 and c_shape != (3,) else K
    E = (0.4 * torch.randn(steps, *E_shape, dtype=f64, generator=g)).requires_grad_(True)
    c = torch.randn(K, *c_shape, dtype=f64, generator=g).requires_grad_(True)
    a = torch.randn(K, *C_shape, dtype=f64, generator=g)
    C = (a @ a.mT).requires_grad_(True)
    weights = torch.randn(K, *c_shape, dtype=f64, generator=g)
    outputs = []
    for fn in (ssm._blocked_recursion, _loop):
        x, X = fn(E, c, C)
        loss = (x * weights).sum() + X.pow(2).sum()
        outputs.append((x, X, *torch.autograd.grad(loss, (E, c, C))))
    for mine, plain in zip(*outputs, strict=True):
        assert mine.shape == plain.shape
        torch.testing.assert_close(mine, plain, rtol=1e-12, atol=1e-12)


def test_long_time_varying_sequence_sequential_equals_parallel():
    """Past the blocked threshold, with a model per step, a mask and a batch (the custom
    backward pass of the Riccati loop and the blockwise recursions): sequential equals
    parallel in every result and every gradient (1e-9)."""
    T, D, M = 3 * ssm._BLOCKED_FROM, 3, 2
    g = torch.Generator().manual_seed(11)
    f64 = torch.float64

    def spd(*shape, dim, scale):
        a = torch.randn(*shape, dim, dim, dtype=f64, generator=g)
        return scale * (a @ a.mT / dim + 0.3 * torch.eye(dim, dtype=f64))

    model = dict(
        y=torch.randn(2, T, M, dtype=f64, generator=g),
        transition_matrix=0.5 * torch.randn(T - 1, D, D, dtype=f64, generator=g),
        transition_cov=spd(T - 1, dim=D, scale=0.5),
        observation_matrix=torch.randn(2, T, M, D, dtype=f64, generator=g),
        observation_cov=spd(2, T, dim=M, scale=0.3),
        initial_loc=torch.randn(2, D, dtype=f64, generator=g),
        initial_cov=spd(dim=D, scale=1.0),
    )
    mask = torch.rand(2, T, generator=g) > 0.3
    results, grads = [], []
    for method in ("sequential", "parallel"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in model.items()}
        # symmetric inputs: the methods read the two triangles of a covariance differently
        args = {k: 0.5 * (v + v.mT) if k.endswith("cov") else v for k, v in leaves.items()}
        r = kalman_smoother(**args, mask=mask, method=method)
        draws = r.transform_noise(torch.randn(3, 2, T, D, dtype=f64, generator=g.manual_seed(5)))
        loss = (
            r.log_normalizer.sum()
            + r.smoothed_means.pow(2).sum()
            + r.smoothed_covs.sum()
            + r.smoothed_cross_covs.sum()
            + r.filtered_covs.pow(2).sum()
            + draws.sin().sum()
        )
        loss.backward()
        results.append(r)
        grads.append({k: v.grad for k, v in leaves.items()})
    for name in FIELDS:
        a, b = getattr(results[0], name), getattr(results[1], name)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    for name in model:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-9)
