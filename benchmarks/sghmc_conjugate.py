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

The speed rows (``--speed``, the default; ``--no-speed`` skips them) time one gradient
evaluation in the same process, one thread a side (``torch.set_num_threads(1)``, XLA's CPU
client single-threaded), on the process's CPU clock, interleaved in ``--repeats`` rounds
(median and min over rounds): pvae's SGHMC step (``train_step`` on the scaled model after
warm-up, Pyro's argument checks off as ``pvae.sample`` runs its steps: the fast potential, and
with ``fast=False`` the plain handler), a hand-written torch
SGHMC step with the same arithmetic and update, and blackjax's SGHMC step in a jitted
``lax.scan`` of 1000 gradient evaluations (compile time printed apart), per gradient.

    python benchmarks/sghmc_conjugate.py
    python benchmarks/sghmc_conjugate.py --seeds 0 1 2 3
    python benchmarks/sghmc_conjugate.py --no-accuracy --repeats 15 --profile 2000
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
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


def _blackjax_per_gradient(x: torch.Tensor, y: torch.Tensor, gradients: int):
    """A jitted blackjax SGHMC run of ``gradients`` gradient evaluations (one integration step
    per call, batches of B rows): returns ``run()`` and its compile seconds, or None."""
    try:
        import blackjax
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

    def logprior(w):
        return -0.5 * jnp.sum(w**2) / PRIOR**2

    def loglik(w, batch):
        xb, yb = batch
        return -0.5 * jnp.sum((yb - xb @ w) ** 2) / NOISE**2

    algo = blackjax.sghmc(
        blackjax.sgmcmc.gradients.grad_estimator(logprior, loglik, N), num_integration_steps=1
    )
    rows = jnp.asarray(np.random.default_rng(0).integers(0, N, size=(gradients, BATCH)))

    @jax.jit
    def chain(key, w0):
        def body(carry, index):
            w, key = carry
            key, sub = jax.random.split(key)
            w = algo.step(sub, w, (xj[index], yj[index]), 1e-3)
            return (w, key), None

        return jax.lax.scan(body, (w0, key), rows)[0][0]

    w0 = jnp.zeros(D, dtype=jnp.float32)
    start = time.process_time()
    jax.block_until_ready(chain(jax.random.PRNGKey(0), w0))
    compile_s = time.process_time() - start

    def run() -> None:
        jax.block_until_ready(chain(jax.random.PRNGKey(1), w0))

    return run, compile_s


def _reference_step(sampler, num_data: int):
    """A hand-written SGHMC step on copies of the sampler's state: the model's log joint
    written out (the Normal prior's and likelihood's log densities, N/B times the batch sum),
    ``torch.autograd.grad``, and the sampler's update with its frozen eta and noise."""
    theta = sampler.theta[0].detach().clone().requires_grad_(True)
    velocity = sampler.velocity[0].clone()
    eta, noise, alpha = sampler._eta[0], sampler._noise[0], sampler.alpha
    generator = torch.Generator().manual_seed(0)
    half_log_2pi = 0.5 * float(np.log(2 * np.pi))

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        xb, yb = batch
        log_prior = (-0.5 / PRIOR**2) * (theta * theta).sum() - D * (np.log(PRIOR) + half_log_2pi)
        resid = yb - xb @ theta
        log_lik = (-0.5 / NOISE**2) * (resid * resid).sum() - len(yb) * (
            np.log(NOISE) + half_log_2pi
        )
        log_joint = log_prior + log_lik * (num_data / len(yb))
        (grad,) = torch.autograd.grad(log_joint, [theta])
        with torch.no_grad():
            draw = torch.randn(velocity.shape, generator=generator)
            velocity.mul_(1 - alpha).add_(grad * eta).add_(draw * noise)
            theta.add_(velocity)
        return float(log_joint.detach())

    return step


def _ratio(values: list[float], base: list[float]) -> float:
    """The median of the per-round ratios."""
    return statistics.median([a / b for a, b in zip(values, base, strict=True)])


def speed(x: torch.Tensor, y: torch.Tensor, repeats: int, steps: int, profile: int) -> None:
    """The interleaved per-gradient timings (see the module's docstring)."""
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    scaled = pvae.scale_to_data(model, N)
    pyro.enable_validation(False)  # as pvae.sample runs every step after a chain's first
    rows = {}
    samplers = {}
    for name, fast in (("pvae SGHMC step", True), ("pvae SGHMC step, fast=False", False)):
        sampler = pvae.inference.SGHMC(fast=fast)
        sampler.setup(scaled, batches[0], num_data=N, num_warmup=200, seed=0)
        for i in range(200):  # the adaptive warm-up: then the step is frozen
            sampler.train_step(scaled, None, *batches[i % len(batches)])
        samplers[name] = sampler

        def pvae_step(batch, sampler=sampler) -> float:
            return sampler.train_step(scaled, None, *batch).loss

        rows[name] = pvae_step
    rows["hand-written torch"] = _reference_step(samplers["pvae SGHMC step"], N)
    peer = _blackjax_per_gradient(x, y, 1000)
    if peer is None:
        print(
            "blackjax speed row skipped: jax and blackjax are not installed (pip install .[bench])"
        )
    else:
        print(f"blackjax compile (first call): {peer[1]:.2f} s of CPU time")
    us: dict[str, list[float]] = {name: [] for name in rows}
    if peer is not None:
        us["blackjax SGHMC (jitted scan)"] = []
    for r in range(repeats + 1):  # round 0 warms up
        names = list(us)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.process_time()
            if name in rows:
                for i in range(steps):
                    rows[name](batches[i % len(batches)])
                per = (time.process_time() - start) / steps
            else:
                assert peer is not None
                peer[0]()
                per = (time.process_time() - start) / 1000
            if r:
                us[name].append(1e6 * per)
    base = us.get("blackjax SGHMC (jitted scan)")
    hand = us["hand-written torch"]
    print(
        f"per gradient evaluation, us (median / min of {repeats} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.1f}):"
    )
    for name, values in us.items():
        line = f"  {name:30s} {statistics.median(values):8.1f} / {min(values):8.1f}"
        line += f"   / hand {_ratio(values, hand):5.2f}"
        if base is not None:
            line += f"   / blackjax {_ratio(values, base):5.2f}"
        print(line)
    if profile:
        prof = cProfile.Profile()
        step = rows["pvae SGHMC step"]
        prof.enable()
        for i in range(profile):
            step(batches[i % len(batches)])
        prof.disable()
        print(f"cProfile of {profile} pvae steps (own time):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    pyro.enable_validation(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=7, help="speed: interleaved rounds")
    parser.add_argument("--steps", type=int, default=200, help="speed: pvae steps per block")
    parser.add_argument("--profile", type=int, default=0, help="speed: cProfile this many steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    x, y, mean, cov = problem()
    if args.speed:
        speed(x, y, args.repeats, args.steps, args.profile)
    if not args.accuracy:
        return
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
