"""GP-VAE step time against sequence length: the Markovian GP-VAE (O(T)) and the dense one.

One ELBO-and-gradient step (``ELBO().loss_and_grads`` on the pair, analytic KL, one
reparameterised draw; gradients zeroed after each step) on one sequence of T frames at
irregular time stamps, for T in {100, 200, 300, 1000, 3000, 10000}. Each row is a function
``step(T) -> Callable[[], object]`` in ``ROWS`` together with the largest T it is run at (the
dense model runs out of time or memory first). The script prints the median milliseconds per
cell (``--repeats`` steps after a warm-up step; one step for T > 1000), the exponent of time
against T fitted by least squares on log-log axes, the machine's load average before and
after, and writes a log-log figure to ``benchmarks/gp_scaling.png``.

Every row measures like with like: L = 2 latent channels, frames of 16 values, Gaussian
likelihood, MLPs with 32 hidden units, float64, the same thread count.

- Markovian rows: :class:`pvae.models.MarkovianGPVAE` (Matérn-3/2 channels), smoothed by
  ``pvae.ssm``'s sequential or parallel method;
- dense row: :class:`pvae.models.GPVAE` (Cauchy kernel, length scale 10, learned kernel), its
  prior covariance factorised by one dense Cholesky decomposition per step: O(T^3) time and
  O(T^2) memory, run up to ``DENSE_LARGEST`` (T = 2000 takes about 26 s and 2.4 GB per step on
  an idle core, too long for this script).

The goal lines give the Markovian rows' time over the dense row's at each T (below 1 from
T = 200 up is the goal) and compare the Markovian model at the largest T with the dense one
at T = 1000.

    python benchmarks/gp_scaling.py            # the full table (1 thread)
    python benchmarks/gp_scaling.py --quick    # T up to 1000, one repeat, no figure
    python benchmarks/gp_scaling.py --versus 200 1000 --repeats 5   # the issue-22 rows

``--versus T ...`` times only those lengths, the three steps interleaved in one process (each
warmed up once, then ``--repeats`` rounds of one step each, the order rotating every round),
on the process's CPU clock, and prints min / median per step and the Markovian / dense ratios
of the medians; no figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from kalman_scaling import fitted_exponent, median_ms

from pvae.inference import ELBO
from pvae.models import GPVAE, MarkovianGPVAE

LENGTHS = (100, 200, 300, 1000, 3000, 10000)
X_DIM, Z_DIM, HIDDEN = 16, 2, (32,)
DTYPE = torch.float64
DENSE_LARGEST = 1000
FIGURE = Path(__file__).with_name("gp_scaling.png")


def sequence(T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence ``(1, T, X_DIM)`` of Gaussian noise at irregular stamps (gaps uniform in
    [0.5, 1.5)), every frame observed: ``(values, times, mask)``."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(1, T, X_DIM, generator=g, dtype=DTYPE)
    times = (0.5 + torch.rand(1, T, generator=g, dtype=DTYPE)).cumsum(-1)
    return values, times, torch.ones(1, T, dtype=torch.bool)


def elbo_step(model: Callable, guide: Callable, args: tuple) -> Callable[[], float]:
    """``ELBO().loss_and_grads`` on the pair, then every parameter's gradient zeroed."""
    engine = ELBO()

    def step() -> float:
        loss = engine.loss_and_grads(model, guide, *args)
        for param in pyro.get_param_store().values():
            param.grad = None
        return loss

    return step


def markovian_step(T: int, method: str) -> Callable[[], float]:
    """The Markovian GP-VAE's ELBO-and-gradient step at length T (``method``: the smoother's)."""
    pyro.clear_param_store()
    vae = MarkovianGPVAE(
        x_dim=X_DIM, z_dim=Z_DIM, nu=1.5, hidden=HIDDEN, likelihood="gaussian", method=method
    ).to(DTYPE)
    return elbo_step(vae.model, vae.guide, sequence(T))


def dense_step(T: int) -> Callable[[], float]:
    """The dense GP-VAE's ELBO-and-gradient step at length T (closed-form KL of the banded
    guide against the dense GP prior)."""
    pyro.clear_param_store()
    vae = GPVAE(
        x_dim=X_DIM,
        z_dim=Z_DIM,
        hidden=HIDDEN,
        likelihood="gaussian",
        kernel="cauchy",
        length_scale=10.0,
        learn_kernel=True,
    ).to(DTYPE)
    return elbo_step(vae.model, vae.guide, sequence(T))


# (name, step(T), largest T)
ROWS: list[tuple[str, Callable[[int], Callable[[], object]], int]] = [
    ("markovian sequential", lambda T: markovian_step(T, "sequential"), 10000),
    ("markovian parallel", lambda T: markovian_step(T, "parallel"), 10000),
    ("dense", dense_step, DENSE_LARGEST),
]


def plot(series: dict[str, tuple[list[int], list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=90)
    for name, (lengths, ms) in series.items():
        ax.loglog(lengths, ms, "o-", label=name)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ELBO + gradient step (ms)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    plt.close(fig)


def goal(series: dict[str, tuple[list[int], list[float]]]) -> None:
    """Print the goal checks: each Markovian row against the dense one at every T both ran
    (faster from T = 200 up), and each Markovian row at its largest T against the dense row
    at T = 1000."""
    dense_ms = dict(zip(*series.get("dense", ([], [])), strict=True))
    print("\ngoal: the Markovian GP-VAE step faster than the dense one from T = 200 up")
    for name, (done, ms) in series.items():
        if name.startswith("markovian"):
            ratios = [
                f"T={T}: {m / dense_ms[T]:.2f}"
                for T, m in zip(done, ms, strict=True)
                if T in dense_ms
            ]
            print(f"  {name:>22} / dense: " + ", ".join(ratios))
    dense = dense_ms.get(1000)
    if dense is None:
        return
    print("\ngoal: the Markovian GP-VAE at its largest T faster than the dense one at T = 1000")
    for name, (done, ms) in series.items():
        if name.startswith("markovian"):
            verdict = "met" if ms[-1] < dense else "NOT met"
            print(
                f"  {name:>22}: {ms[-1]:.0f} ms at T = {done[-1]} against dense {dense:.0f} ms "
                f"at T = 1000: {verdict}"
            )


def versus(lengths: list[int], repeats: int) -> None:
    """The three steps at each T interleaved: min / median CPU ms and the ratios to dense."""
    print(
        f"{'T':>6} " + " ".join(f"{name:>22}" for name, _, _ in ROWS) + "   (CPU ms, min / median)"
    )
    for T in lengths:
        steps = [make(T) for _, make, _ in ROWS]  # each model keeps its own parameter names
        for step in steps:
            step()  # warm-up
        times: list[list[float]] = [[] for _ in steps]
        for r in range(repeats):
            shift = r % len(steps)
            for i in [*range(shift, len(steps)), *range(shift)]:
                start = time.process_time()
                steps[i]()
                times[i].append(1e3 * (time.process_time() - start))
        medians = [statistics.median(t) for t in times]
        cells = [f"{min(t):.1f} / {m:.1f}" for t, m in zip(times, medians, strict=True)]
        ratios = ", ".join(
            f"{name} / dense {m / medians[-1]:.2f}"
            for (name, _, _), m in zip(ROWS[:-1], medians[:-1], strict=True)
        )
        load = os.getloadavg()[0]
        print(f"{T:>6} " + " ".join(f"{c:>22}" for c in cells) + f"   {ratios} (load {load:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T up to 1000, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cell (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument(
        "--versus",
        type=int,
        nargs="+",
        metavar="T",
        help="only these lengths (at most DENSE_LARGEST), the three steps interleaved",
    )
    args = parser.parse_args()
    if args.versus is not None and not all(1 < T <= DENSE_LARGEST for T in args.versus):
        raise SystemExit(f"--versus: lengths between 2 and {DENSE_LARGEST} expected")
    if args.repeats < 1:
        raise SystemExit("--repeats: at least 1 expected")
    torch.set_num_threads(args.threads)
    if args.versus is not None:
        print(f"load average before: {os.getloadavg()}  threads: {args.threads}")
        versus(args.versus, args.repeats)
        print(f"load average after: {os.getloadavg()}")
        return
    lengths = [T for T in LENGTHS if T <= 1000] if args.quick else list(LENGTHS)
    repeats = 1 if args.quick else args.repeats
    print(f"load average before: {os.getloadavg()}  threads: {args.threads}")
    series: dict[str, tuple[list[int], list[float]]] = {}
    print(f"{'T':>6} " + " ".join(f"{name:>22}" for name, _, _ in ROWS) + "   (ms per step)")
    for T in lengths:
        cells = []
        for name, make, largest in ROWS:
            if T > largest:
                cells.append(f"{'-':>22}")
                continue
            # long cells (T > 1000): one step after the warm-up, to keep the run short
            ms = median_ms(make(T), repeats if T <= 1000 else 1, args.clock)
            series.setdefault(name, ([], []))
            series[name][0].append(T)
            series[name][1].append(ms)
            cells.append(f"{ms:>22.1f}")
        print(f"{T:>6} " + " ".join(cells), flush=True)
    print("\nfitted exponent of time against T (least squares on log-log axes)")
    for name, (done, ms) in series.items():
        if len(done) > 1:
            print(f"  {name:>22}: T^{fitted_exponent(done, ms):.2f}  (T = {done[0]}..{done[-1]})")
    goal(series)
    print(f"load average after: {os.getloadavg()}")
    if not args.quick:
        plot(series, FIGURE)
        print(f"figure: {FIGURE}")


if __name__ == "__main__":
    main()
