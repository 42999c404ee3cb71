"""pvae's Kalman smoother eager against ``torch.compile``: how much of the fixed per-call cost
at short T is Python and operator dispatch that a compiler removes.

The model and data are ``kalman_scaling.py``'s (D = 4, M = 2, float64, one sequence). For each
length and method, the whole call (checks, filter, smoother; log Z, smoothed means and
covariances returned) is compiled once with static shapes, its outputs compared with the eager
ones, and the two sides timed in interleaved blocks of calls (one torch thread, the process's
CPU clock, median of the blocks' per-call times). Compile time (wall) is reported apart. The
input checks' host synchronisation breaks the graph (Dynamo warns about it), so what is
compiled is the filter and smoother after the checks.

Run: ``python benchmarks/kalman_compile.py --lengths 100 1000`` (a minute or two of compiling
per length and method).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from dynamax_worker import KEYS
from kalman_scaling import make_model

from pvae.ssm import kalman_smoother

ARGUMENTS = ("y", *KEYS)  # kalman_smoother's positional order


def per_call_ms(fn: Callable[[], object], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def compare(T: int, method: str, backend: str, blocks: int) -> dict[str, float]:
    """Eager and compiled per-call times (ms), the compile time (s) and the largest output
    difference for one length and method."""
    model = make_model(1, T, torch.float64)
    args = [model[name][0] if name == "y" else model[name] for name in ARGUMENTS]

    def smooth(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = kalman_smoother(*values, method=method)
        return result.log_normalizer, result.smoothed_means, result.smoothed_covs

    compiled = torch.compile(smooth, dynamic=False, backend=backend)
    start = time.perf_counter()
    got = compiled(*args)
    compile_s = time.perf_counter() - start
    expected = smooth(*args)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
    calls = max(3, int(0.2e3 / max(0.1, per_call_ms(lambda: smooth(*args), 3))))
    eager, fast = [], []
    for _ in range(blocks):
        eager.append(per_call_ms(lambda: smooth(*args), calls))
        fast.append(per_call_ms(lambda: compiled(*args), calls))
    e, c = statistics.median(eager), statistics.median(fast)
    return dict(eager_ms=e, compiled_ms=c, ratio=c / e, compile_s=compile_s, max_diff=diff)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--methods", nargs="+", default=["parallel", "sequential"])
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks per side")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for T in args.lengths:
        for method in args.methods:
            row = dict(T=T, method=method, **compare(T, method, args.backend, args.blocks))
            print(
                f"T={T} {method}: eager {row['eager_ms']:.2f} ms, compiled "
                f"{row['compiled_ms']:.2f} ms, ratio {row['ratio']:.2f}, compile "
                f"{row['compile_s']:.1f} s, max diff {row['max_diff']:.1e}",
                flush=True,
            )
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
