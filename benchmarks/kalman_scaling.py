"""Kalman smoothing beside jitted dynamax: the rows of the performance table, and T scaling.

Each row times ``pvae.ssm.kalman_smoother`` (D = 4, M = 2, float64, all smoothed moments:
filtered and smoothed means and covariances, cross-covariances, backward conditionals, log
normaliser) beside its peer, dynamax's jitted ``lgssm_smoother`` (sequential and parallel),
on the same model; gradient rows time forward + backward of the log normaliser (pvae runs the
whole smoother forward, dynamax its filter only). B = 64 rows batch the sequences over one
shared model (dynamax: ``vmap``; Pyro's ``GaussianHMM.log_prob`` as a second peer). The two
sides run interleaved in one process, one thread each (``torch.set_num_threads(1)``, XLA's
CPU client single-threaded), timed with the process CPU clock; each cell is the median of the
repeats. dynamax's compile time (its first call) is printed separately. Without ``jax`` and
``dynamax`` (``pip install -e .[bench]``) the peer columns are skipped with a message. The
log normalisers of the two sides are checked to agree (1e-6 a step: dynamax adds 1e-9 to the
diagonal of the covariances it solves with) before anything is timed.

    python benchmarks/kalman_scaling.py            # the table (a few minutes)
    python benchmarks/kalman_scaling.py --quick    # T up to 1000
    python benchmarks/kalman_scaling.py --scaling  # the older table: T^k exponents, float32
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import harness
import pyro.distributions as dist
import torch

from pvae.ssm import kalman_smoother

D, M = 4, 2


def make_model(batch: int, T: int, dtype: torch.dtype) -> dict:
    """A damped rotation in two planes, observed through a random 2 x 4 matrix.

    The initial state is ``N(0, A A^T + Q)``: one transition after Pyro's ``N(0, I)``.
    """
    g = torch.Generator().manual_seed(0)
    c, s = math.cos(0.2), math.sin(0.2)
    block = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    A = 0.95 * torch.block_diag(block, block)
    Q = 0.1 * torch.eye(D, dtype=torch.float64)
    H = torch.randn(M, D, dtype=torch.float64, generator=g)
    R = 0.5 * torch.eye(M, dtype=torch.float64)
    y = torch.randn(batch, T, M, dtype=torch.float64, generator=g)
    model = dict(
        y=y,
        transition_matrix=A,
        transition_cov=Q,
        observation_matrix=H,
        observation_cov=R,
        initial_loc=torch.zeros(D, dtype=torch.float64),
        initial_cov=A @ A.T + Q,
    )
    return {k: v.to(dtype) for k, v in model.items()}


def pyro_hmm(model: dict, T: int) -> dist.GaussianHMM:
    """The same model as Pyro's GaussianHMM: x_0 ~ N(0, I) before step 1, ``x @ A^T``."""
    dtype = model["y"].dtype
    zeros = torch.zeros(D, dtype=dtype)
    return dist.GaussianHMM(
        dist.MultivariateNormal(zeros, torch.eye(D, dtype=dtype)),
        model["transition_matrix"].T,
        dist.MultivariateNormal(zeros, model["transition_cov"]),
        model["observation_matrix"].T,
        dist.MultivariateNormal(torch.zeros(M, dtype=dtype), model["observation_cov"]),
        duration=T,
    )


def median_ms(fn, repeats: int, clock: str) -> float:
    now = harness.CLOCKS[clock]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append(1e3 * (now() - start))
    return statistics.median(times)


def fitted_exponent(lengths: list[int], ms: list[float]) -> float:
    x = [math.log(t) for t in lengths]
    y = [math.log(v) for v in ms]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum(
        (a - mx) ** 2 for a in x
    )


def scaling_main(argv: list[str]) -> None:
    """The older table: both methods and Pyro against T, batch 1 and 64, float64 and 32."""
    parser = argparse.ArgumentParser(description="pvae.ssm time against T (--scaling)")
    parser.add_argument("--quick", action="store_true", help="T up to 1000, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    harness.add_clock_arg(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--grad", action="store_true", help="time forward and backward")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [100, 1000] if args.quick else [100, 1000, 10000]
    repeats = 1 if args.quick else args.repeats
    print(f"load average before: {os.getloadavg()}  threads: {args.threads}  grad: {args.grad}")

    # correctness first: pvae's log normaliser equals Pyro's on the converted model
    check = make_model(2, 50, torch.float64)
    ours = kalman_smoother(**check, method="parallel").log_normalizer
    theirs = pyro_hmm(check, 50).log_prob(check["y"])
    error = (ours - theirs).abs().max().item()
    print(f"log normaliser: pvae {ours.tolist()} pyro {theirs.tolist()} (max diff {error:.1e})")
    if error > 1e-8:
        raise SystemExit("pvae and Pyro disagree; the timing is meaningless")

    header = (
        f"{'T':>6} {'batch':>5} {'dtype':>8} {'sequential':>11} {'parallel':>9} {'pyro':>8}"
        f" {'par/pyro':>9} {'seq/par':>8}   (ms; load = 1-minute load average)"
    )
    exponents = []
    for batch in args.batches:
        for dtype in (torch.float64, torch.float32):
            print(f"\nload average {os.getloadavg()[0]:.2f}")
            print(header)
            series: dict[str, list[float]] = {}
            for T in lengths:
                model = make_model(batch, T, dtype)
                if args.grad:
                    model = {k: v.requires_grad_(True) for k, v in model.items()}
                hmm = pyro_hmm(model, T)
                cells = {
                    "sequential": lambda m=model: kalman_smoother(**m, method="sequential"),
                    "parallel": lambda m=model: kalman_smoother(**m, method="parallel"),
                    "pyro GaussianHMM": lambda m=model, h=hmm: h.log_prob(m["y"]),
                }
                row = {}
                for name, fn in cells.items():
                    timed = with_backward(fn) if args.grad else without_grad(fn)
                    row[name] = median_ms(timed, repeats, args.clock)
                    series.setdefault(name, []).append(row[name])
                seq, par, pyro = row.values()
                print(
                    f"{T:>6} {batch:>5} {str(dtype)[6:]:>8} {seq:>11.2f} {par:>9.2f} {pyro:>8.2f}"
                    f" {par / pyro:>9.2f} {seq / par:>8.2f}"
                )
            for name, ms in series.items():
                exponents.append((batch, str(dtype)[6:], name, fitted_exponent(lengths, ms)))
    print("\nfitted exponent of time against T (least squares on log-log axes)")
    for batch, dtype, name, k in exponents:
        print(f"  batch {batch:>3} {dtype:>8} {name:>18}: T^{k:.2f}")
    print(f"load average after: {os.getloadavg()}")


def without_grad(fn):
    def wrapped():
        with torch.no_grad():
            return fn()

    return wrapped


def with_backward(fn):
    """Forward, then backward of the log normaliser (plus the smoothed means for pvae)."""

    def wrapped():
        out = fn()
        if isinstance(out, torch.Tensor):
            out.sum().backward()
        else:
            (out.log_normalizer.sum() + out.smoothed_means.sum()).backward()

    return wrapped


# --------------------------------------------------------------------------------------------
# The table beside dynamax

ROWS: list[tuple[str, str, tuple[int, ...], int, bool]] = [
    # (label, pvae method, lengths, batch, gradient)
    ("smoother", "sequential", (100, 1000, 10000), 1, False),
    ("smoother", "parallel", (100, 1000, 10000, 100000), 1, False),
    ("smoother", "auto", (100, 1000, 10000, 100000), 1, False),
    ("grad log Z", "sequential", (1000,), 1, True),
    ("grad log Z", "parallel", (100, 1000, 10000), 1, True),
    ("grad log Z", "auto", (100, 1000, 10000), 1, True),
    ("smoother", "sequential", (1000,), 64, False),
    ("smoother", "parallel", (1000,), 64, False),
    ("smoother", "auto", (1000,), 64, False),
    ("grad log Z", "auto", (1000,), 64, True),
]


def single_thread_jax():
    """jax with float64 and one CPU thread, or None when jax or dynamax is missing."""
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    try:
        import jax
        from dynamax.linear_gaussian_ssm import inference, parallel_inference
    except ImportError as error:
        print(f"dynamax/jax not importable ({error}): peer columns skipped (pip install .[bench])")
        return None
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu")
    return jax, inference, parallel_inference


_JITTED: dict[tuple[str, bool, bool], tuple[Callable, Callable]] = {}


def dynamax_fn(peer, model: dict, method: str, grad: bool) -> tuple[Callable, Callable]:
    """(run once, log normaliser) of dynamax's jitted smoother (or filter gradient).

    The jitted functions are made once per (method, gradient, batched), so that jax compiles
    each shape once (the auto rows reuse the sequential and parallel rows' compilations).
    """
    jax, inference, parallel = peer
    jnp = jax.numpy
    arrays = {k: jnp.asarray(v.detach().numpy()) for k, v in model.items()}
    theta = tuple(arrays[k] for k in KEYS)
    y = arrays["y"]
    key = (method, grad, y.ndim == 3)
    if key not in _JITTED:
        module = parallel if method == "parallel" else inference

        def params(theta):
            A, Q, H, R, m1, P1 = theta
            return inference.make_lgssm_params(m1, P1, A, Q, H, R)

        def smooth(theta, y):
            post = module.lgssm_smoother(params(theta), y)
            return post.marginal_loglik, post.smoothed_means, post.smoothed_covariances

        def log_z(theta, y):
            return module.lgssm_filter(params(theta), y).marginal_loglik

        def batch(fn):
            return jax.vmap(fn, in_axes=(None, 0)) if key[2] else fn

        _JITTED[key] = (jax.jit(batch(jax.grad(log_z) if grad else smooth)), jax.jit(batch(log_z)))
    fn, value = _JITTED[key]

    def run():
        jax.block_until_ready(fn(theta, y))

    return run, lambda: torch.as_tensor(jax.device_get(value(theta, y)).tolist())


KEYS = (
    "transition_matrix",
    "transition_cov",
    "observation_matrix",
    "observation_cov",
    "initial_loc",
    "initial_cov",
)


def pvae_fn(model: dict, method: str, grad: bool) -> Callable:
    if grad:
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in model.items()}

        def run():
            kalman_smoother(**leaves, method=method).log_normalizer.sum().backward()

        return run

    def run_no_grad():
        with torch.no_grad():
            kalman_smoother(**model, method=method)

    return run_no_grad


def interleaved_ms(fns: list[Callable], budget_s: float, max_repeats: int) -> list[float]:
    """Median CPU milliseconds of each function, run in turn (order alternating)."""
    now = time.process_time
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    spent, k = 0.0, 0
    while k < max_repeats and (k < 3 or spent < budget_s):
        order = range(len(fns)) if k % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start = now()
            fns[i]()
            times[i].append(now() - start)
            spent += times[i][-1]
        k += 1
    return [1e3 * statistics.median(t) for t in times]


def main() -> None:
    if "--scaling" in sys.argv[1:]:
        scaling_main([a for a in sys.argv[1:] if a != "--scaling"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T up to 1000")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per cell")
    parser.add_argument("--max-repeats", type=int, default=15)
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        help="indices into ROWS (default: all); jax compiles "
        "each shape once, tens of seconds for a parallel smoother on a loaded machine",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    peer = single_thread_jax()
    print(f"load average before: {os.getloadavg()}  (1 thread per side, process CPU clock)")
    print(
        f"{'row':<12} {'method':<10} {'B':>3} {'T':>6} {'pvae ms':>9} {'dynamax ms':>10}"
        f" {'ratio':>6} {'(jit s)':>8} {'peer method':>11} {'load':>5}"
    )
    for index, (label, method, lengths, batch, grad) in enumerate(ROWS):
        if args.rows is not None and index not in args.rows:
            continue
        for T in lengths:
            if args.quick and T > 1000:
                continue
            model = make_model(batch, T, torch.float64)
            if batch == 1:
                model["y"] = model["y"][0]
            fns = [pvae_fn(model, method, grad)]
            names = ["sequential", "parallel"] if method == "auto" else [method]
            compile_s = []
            if peer is not None:
                with torch.no_grad():
                    ours = kalman_smoother(**model, method=method).log_normalizer
                for name in names:
                    run, value = dynamax_fn(peer, model, name, grad)
                    start = time.perf_counter()
                    run()
                    compile_s.append(time.perf_counter() - start)
                    error = (ours - value()).abs().max().item()
                    # dynamax adds 1e-9 to the diagonal of every covariance it solves with
                    # (psd_solve), which moves log Z by about 1e-7 a step on this model
                    if error > 1e-6 * T:
                        raise SystemExit(f"log Z differs from dynamax's by {error:.1e}")
                    fns.append(run)
            ms = interleaved_ms(fns, args.budget, args.max_repeats)
            if peer is None:
                peer_ms, peer_name, ratio, jit = float("nan"), "skipped", float("nan"), ""
            else:
                best = min(range(1, len(ms)), key=lambda i: ms[i])
                peer_ms, peer_name = ms[best], names[best - 1]
                ratio, jit = ms[0] / peer_ms, f"{compile_s[best - 1]:.2f}"
            print(
                f"{label:<12} {method:<10} {batch:>3} {T:>6} {ms[0]:>9.2f} {peer_ms:>10.2f}"
                f" {ratio:>6.2f} {jit:>8} {peer_name:>11} {os.getloadavg()[0]:>5.1f}",
                flush=True,
            )
            if batch == 64 and not grad and method == "auto":
                hmm = pyro_hmm(model, T)
                with torch.no_grad():
                    (pyro_ms,) = interleaved_ms(
                        [lambda h=hmm, y=model["y"]: h.log_prob(y)], args.budget, args.max_repeats
                    )
                print(
                    f"{'':<12} Pyro GaussianHMM.log_prob (filter only) B=64 T={T}: {pyro_ms:.2f} ms"
                )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
