"""KalmanELBO with and without a conjugate (EM / natural-gradient) update of the LDS
prior's A and Q.

Prints, per initialisation seed, the steps to come within 1 nat per sequence of the true
log-likelihood on ``lds`` and the bound after 60 steps (see the docstring of
``pvae.inference.kalman``). Run: ``python benchmarks/kalman_conjugate_update.py`` (about 2 min).
"""

import pyro
import torch

import pvae
from pvae.inference import KalmanELBO
from pvae.models import StructuredVAE

torch.set_default_dtype(torch.float64)
ds = pvae.data.load("lds", sizes=(200, 10, 10), num_steps=50, seed=0)
values, times, mask = ds.train
values = values.double()
N = values.shape[0]
truth = float(pvae.data.lds_log_likelihood(ds, "train").mean())


def conjugate_update(m):
    with torch.no_grad():
        q = m.posterior(values.reshape(N, 50, 4), mask)
        s = q.smoother
        mu, P, X = s.smoothed_means, s.smoothed_covs, s.smoothed_cross_covs
        second = P + mu[..., :, None] * mu[..., None, :]
        S00 = second[:, :-1].sum((0, 1))
        S11 = second[:, 1:].sum((0, 1))
        S10 = (X + mu[:, 1:, :, None] * mu[:, :-1, None, :]).sum((0, 1))
        A = S10 @ torch.linalg.inv(S00)
        Q = (S11 - A @ S10.T) / (N * 49)
        Q = 0.5 * (Q + Q.T)
        m.dynamics.set_transition(A, Q)


def run(conjugate, steps=60, seed=0, lr=0.05):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    m = StructuredVAE(
        x_dim=4, z_dim=2, likelihood="gaussian", net="linear", exact_potentials=True
    ).double()
    params = list(m.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    eng = KalmanELBO()
    reached, bounds = None, []
    for step in range(steps):
        opt.zero_grad()
        rec = eng.train_step(m.model, m.guide, values, times, mask)
        opt.step()
        if conjugate:
            conjugate_update(m)
        b = rec.bound / N
        bounds.append(b)
        if reached is None and b > truth - 1.0:
            reached = step + 1
    final = -eng.loss(m.model, m.guide, values, times, mask) / N
    return reached, final


print("truth", truth)
for seed in (0, 1, 2):
    for conj in (False, True):
        print(seed, "conjugate" if conj else "plain", run(conj, seed=seed), flush=True)
