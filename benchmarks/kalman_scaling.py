"""Kalman smoother time against sequence length: pvae.ssm's sequential and parallel methods.

For D = 4 (M = 2 observed coordinates), T in {100, 1000, 10000}, batch 1 and 64, float64 and
float32, prints the median milliseconds of ``pvae.ssm.kalman_smoother`` (filtered and
smoothed means and covariances, cross-covariances, log normaliser) for each method, the
exponent of time against T fitted by least squares on log-log axes, and, as the reference
row, Pyro's ``GaussianHMM.log_prob`` (log normaliser only, parallel scan) on the same model,
converted to Pyro's conventions (initial state before the first step, matrices on the right).
The two log normalisers are checked to agree before anything is timed.

    python benchmarks/kalman_scaling.py            # the full table
    python benchmarks/kalman_scaling.py --quick    # T up to 1000, one repeat

The three methods of a row are timed one after the other in the same process, so that a
machine shared with other jobs slows them alike: ``par/pyro`` (pvae's parallel smoother over
Pyro's log normaliser) is the robust figure; ``seq/par`` compares pvae's two methods.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T up to 1000, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    harness.add_clock_arg(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--grad", action="store_true", help="time forward and backward")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
