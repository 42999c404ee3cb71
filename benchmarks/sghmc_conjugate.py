"""SGHMC's defaults on a conjugate Bayesian linear regression, and blackjax beside it.

The problem (issue 19's first): N = 1000 datapoints, d = 5 equicorrelated features
(rho = 0.5), noise sd 1, prior N(0, 10^2 I), minibatches of B = 100; the exact posterior is
Gaussian. pvae runs exactly as the README's snippet: ``pvae.sample(model, (x, y),
sampler=SGHMC(), num_chains=4, batch_size=100, seed=...)`` with the default warm-up and draws
(1000 + 1000 steps per chain: 8000 gradient evaluations, warm-up included).

It prints, per run: the worst split R-hat, the lowest bulk ESS, the sd ratios to the exact
posterior, the mean errors in posterior sd, the wall time and the gradient evaluations.

When ``jax`` and ``blackjax`` import, blackjax's SGHMC (``num_integration_steps=10``, identity
mass) and SGLD run on the same data with the same minibatch size and the same number of
gradient evaluations per chain (half of them burn-in, discarded), from the same uniform
(-2, 2) starts, over a few step sizes (blackjax has no adaptation: its step is the user's),
and the same figures are printed beside pvae's, with ESS per 1000 gradient evaluations.
Otherwise a line says they were skipped. ``pip install jax blackjax`` (the ``bench`` extra)
to run them; they are never a test dependency.

    python benchmarks/sghmc_conjugate.py
    python benchmarks/sghmc_conjugate.py --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch

import pvae

N, D, RHO, NOISE, PRIOR, BATCH, CHAINS = 1000, 5, 0.5, 1.0, 10.0, 100, 4


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, D), y (N,), the exact posterior mean (D,) and covariance (D, D)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(N, 1, generator=g)
    x = RHO**0.5 * common + (1 - RHO) ** 0.5 * torch.randn(N, D, generator=g)
    y = x @ torch.linspace(-1.0, 1.5, D) + NOISE * torch.randn(N, generator=g)
    precision = torch.eye(D) / PRIOR**2 + x.T @ x / NOISE**2
    cov = torch.linalg.inv(precision)
    return x, y, cov @ x.T @ y / NOISE**2, cov


def model(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(0.0, PRIOR).expand([D]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, NOISE), obs=y)


def report(
    name: str,
    draws: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
    seconds: float,
    gradients: int,
) -> None:
    """draws: (chains, draws, D)."""
    post = pvae.Posterior(
        samples={"w": draws},
        log_joint=torch.zeros(draws.shape[:2], dtype=torch.float64),
        warmup_log_joint=torch.zeros(draws.shape[0], 0),
    )
    w = draws.reshape(-1, D).double()
    sd = cov.diag().sqrt().double()
    if not bool(torch.isfinite(w).all()):
        print(f"{name:32s} diverged (non-finite draws)")
        return
    rhat = float(post.rhat()["w"].max())
    ess = float(post.ess()["w"].min())
    ratio = (w.std(0) / sd).tolist()
    error = ((w.mean(0) - mean.double()) / sd).abs().max().item()
    print(
        f"{name:32s} R-hat {rhat:6.3f}  min ESS {ess:6.0f}  sd ratios "
        f"[{', '.join(f'{r:.2f}' for r in ratio)}]  max |mean err| {error:5.2f} sd  "
        f"{seconds:6.1f} s  {gradients} grads  ESS/1000 grads {1000 * ess / gradients:5.1f}"
    )


def run_pvae(
    seed: int, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor
) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    post = pvae.sample(
        model,
        (x, y),
        sampler=pvae.inference.SGHMC(),
        num_chains=CHAINS,
        batch_size=BATCH,
        seed=seed,
        progress=False,
    )
    seconds = time.perf_counter() - start
    print(f"(pvae seed {seed}: {time.process_time() - cpu:.1f} s of CPU time)")
    steps = CHAINS * (post.settings["warmup"] + post.num_samples)
    report(f"pvae SGHMC() seed {seed}", post.samples["w"], mean, cov, seconds, steps)


def run_blackjax(
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
    gradients_per_chain: int,
) -> None:
    import blackjax
    import jax
    import jax.numpy as jnp

    xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

    def logprior(w):
        return -0.5 * jnp.sum(w**2) / PRIOR**2

    def loglik(w, batch):
        xb, yb = batch
        return -0.5 * jnp.sum((yb - xb @ w) ** 2) / NOISE**2

    grad = blackjax.sgmcmc.gradients.grad_estimator(logprior, loglik, N)
    rng = np.random.default_rng(seed)

    def batch_rows(chain_rng: np.random.Generator, calls: int) -> np.ndarray:
        """(calls, B) row indices: a fresh permutation per epoch, as pvae's loop draws them."""
        epochs = -(-calls * BATCH // N)
        rows = np.concatenate([chain_rng.permutation(N) for _ in range(epochs)])
        return rows[: calls * BATCH].reshape(calls, BATCH)

    configs = [(f"blackjax SGHMC eps={e:g}", "sghmc", e) for e in (3e-3, 1e-2, 2e-2)]
    configs += [(f"blackjax SGLD eps={e:g}", "sgld", e) for e in (1e-4, 3e-4, 6e-4)]
    for name, kind, step in configs:
        if kind == "sghmc":  # 10 integration steps (10 gradients) per call, momentum refreshed
            algo = blackjax.sghmc(grad, num_integration_steps=10, alpha=10.0)
            per_call = 10
        else:
            algo = blackjax.sgld(grad)
            per_call = 1

        def chain_fn(key, w0, rows, algo=algo, step=step):
            def body(carry, index):
                w, key = carry
                key, sub = jax.random.split(key)
                w = algo.step(sub, w, (xj[index], yj[index]), step)
                return (w, key), w

            return jax.lax.scan(body, (w0, key), rows)[1]

        run = jax.jit(chain_fn)
        calls = gradients_per_chain // per_call
        keep = calls // 2
        draws = np.zeros((CHAINS, keep, D), dtype=np.float64)
        start = time.perf_counter()
        for chain in range(CHAINS):
            rows = batch_rows(np.random.default_rng([seed, chain]), calls)
            w0 = jnp.asarray(rng.uniform(-2.0, 2.0, D).astype(np.float32))
            path = run(jax.random.PRNGKey(seed * 1000 + chain), w0, jnp.asarray(rows))
            draws[chain] = np.asarray(path)[calls - keep :]
        seconds = time.perf_counter() - start
        report(
            f"{name} seed {seed}",
            torch.from_numpy(draws),
            mean,
            cov,
            seconds,
            CHAINS * calls * per_call,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    x, y, mean, cov = problem()
    print(f"posterior sds: {[round(v, 4) for v in cov.diag().sqrt().tolist()]}")
    for seed in args.seeds:
        run_pvae(seed, x, y, mean, cov)
    try:
        import blackjax  # noqa: F401
        import jax  # noqa: F401
    except ImportError:
        print(
            "blackjax comparison skipped: jax and blackjax are not installed "
            "(pip install jax blackjax)"
        )
        return
    for seed in args.seeds:
        run_blackjax(seed, x, y, mean, cov, gradients_per_chain=2000)


if __name__ == "__main__":
    main()
