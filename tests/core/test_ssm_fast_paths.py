"""pvae.ssm's shortcuts give the numbers of the plain recursions (float64).

- A model shared by all steps, every step observed: the sequential filter stops its covariance
  loop once a step leaves the filtered covariance bitwise unchanged (steady state), and the
  smoother likewise; the same model given once per step takes no shortcut.
- ``method="auto"`` is one of the two methods, chosen by the number of steps.
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


@pytest.mark.parametrize("T", [5, ssm.AUTO_SEQUENTIAL_MAX_STEPS, ssm.AUTO_SEQUENTIAL_MAX_STEPS + 1])
def test_auto_is_one_of_the_methods(T):
    model = rotating_model(T, (2,))
    chosen = "sequential" if T <= ssm.AUTO_SEQUENTIAL_MAX_STEPS else "parallel"
    auto = kalman_smoother(**model, method="auto")
    assert auto.method == chosen
    assert kalman_smoother(**model).method == chosen  # the default
    reference = kalman_smoother(**model, method=chosen)
    for name in FIELDS:
        assert torch.equal(getattr(auto, name), getattr(reference, name)), name
