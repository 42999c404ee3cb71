"""Kalman smoothing beside jitted dynamax: the rows of the performance table, and T scaling.

Each row times ``pvae.ssm.kalman_smoother`` (D = 4, M = 2, float64, all smoothed moments:
filtered and smoothed means and covariances, cross-covariances, backward conditionals, log
normaliser) beside its peer, dynamax's jitted ``lgssm_smoother`` (sequential and parallel;
for pvae's ``auto`` rows both, the faster one reported), on the same model; gradient rows time
forward + backward of the log normaliser (pvae runs the whole smoother forward, dynamax its
filter only). B = 64 rows batch the sequences over one shared model (dynamax: ``vmap``;
Pyro's ``GaussianHMM.log_prob`` as a second peer).

dynamax runs in its own jax-only process (``dynamax_worker.py``, started with
``--peer-python``, default this interpreter): in a process that has imported torch, its
parallel smoother at T = 10^4 stopped in compilation with every thread asleep. (It can in the
jax-only worker too: there, at T = 10^4, the CPU time stops after a minute or two with every
thread asleep, while the same jitted function alone in a script compiles in 40-70 s; a stack
of the stopped worker shows the first call compiled and waiting for its result, a deadlock
in XLA's CPU runtime. So each first call is bounded by ``--compile-timeout``.) Each cell
writes the model to a temporary ``.npz``; the worker loads it, compiles (timed apart on the
wall clock: the ``jit s`` column) and warms up. Then the two sides are interleaved in
blocks: pvae's first call sets k (about 0.25 s of pvae calls, 1 to 20), and each round times
k pvae calls here, then asks the worker to time k calls of each dynamax method there, the
order reversed every other round (at least 3 rounds, then until ``--budget`` seconds of
timed calls or ``--max-rounds``). Both sides run one thread (``torch.set_num_threads(1)``,
XLA's CPU client single-threaded) and time each call on their own process's CPU clock; each
cell prints the median and min over the calls. While one side runs, the other waits on the
pipe. Before anything is timed, both sides' log Z, smoothed means and smoothed covariances
are checked to agree to 1e-8 on one input (T = 50, both methods of each side; dynamax's
1e-9 diagonal boost turned off for the check), and each cell's log Z to 1e-9 a step with
the boost on. A compilation over ``--compile-timeout`` seconds ends the worker and skips that
peer method (a fresh worker serves the next cell); ``--parallel-peer-max-t`` skips
dynamax's parallel method above a length. Without ``jax`` and ``dynamax`` in the worker's
interpreter (``pip install -e .[bench]``) the peer columns print "skipped".

    python benchmarks/kalman_scaling.py            # the table (an hour on a loaded machine)
    python benchmarks/kalman_scaling.py --quick    # T up to 1000
    python benchmarks/kalman_scaling.py --rows 3 4 5 --parallel-peer-max-t 1000
    python benchmarks/kalman_scaling.py --scaling  # the older table: T^k exponents, float32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import harness
import numpy
import pyro.distributions as dist
import torch
from dynamax_worker import KEYS  # the model's arrays, as the worker reads them (no jax import)

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


class DynamaxProcess:
    """dynamax in its own jax-only process (``dynamax_worker.py``), fed models through ``.npz``.

    ``python`` is the interpreter that runs the worker (default: this one). When jax or
    dynamax cannot be imported there, ``error`` says so and the peer columns are skipped.
    A request that takes longer than ``timeout_s`` (a compilation) ends the worker, and the
    next request starts a fresh one.
    """

    def __init__(self, python: str, folder: str) -> None:
        self.python, self.folder = python, folder
        self.process: subprocess.Popen | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.error: str | None = None
        self.versions = ""
        self.files = 0
        self.start()

    def start(self) -> None:
        worker = Path(__file__).with_name("dynamax_worker.py")
        self.process = subprocess.Popen(
            [self.python, str(worker)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        lines: queue.Queue[str] = queue.Queue()
        self.lines = lines
        out = self.process.stdout
        assert out is not None

        def read() -> None:
            for line in out:
                lines.put(line)
            lines.put("")  # end of output: the worker exited

        threading.Thread(target=read, daemon=True).start()
        first = self.request(None, timeout_s=300.0)
        if "error" in first:
            self.error = first["error"]
            self.close()
        else:
            self.versions = f"jax {first['jax']}, dynamax {first['dynamax']}"

    def request(self, message: dict | None, timeout_s: float = 300.0) -> dict:
        """Send one request (None: read the greeting) and wait for its reply."""
        if self.process is None:
            self.start()
            if self.error is not None:
                return {"error": self.error}
        assert self.process is not None and self.process.stdin is not None
        if message is not None:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            self.close()
            return {"error": f"no reply within {timeout_s:.0f} s", "timeout": True}
        if not line:
            return {"error": "the worker exited"}
        return json.loads(line)

    def save(self, model: dict) -> str:
        """The model's arrays in a fresh ``.npz`` (float64), its path."""
        self.files += 1
        path = os.path.join(self.folder, f"model{self.files}.npz")
        numpy.savez(path, **{k: model[k].detach().numpy() for k in (*KEYS, "y")})
        return path

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None


def check_against_dynamax(
    peer: DynamaxProcess,
    tolerance: float = 1e-8,
    methods: tuple[str, ...] = ("sequential", "parallel"),
) -> None:
    """Both sides' log Z, smoothed means and covariances on one input agree to ``tolerance``.

    dynamax adds 1e-9 to the diagonal of every matrix it factorises (``psd_solve``); the
    check runs it without that boost, so that both compute the same quantities exactly.
    """
    model = make_model(1, 50, torch.float64)
    model["y"] = model["y"][0]
    path = peer.save(model)
    f64 = torch.float64
    for method in methods:
        theirs = peer.request({"op": "check", "npz": path, "method": method, "boost": 0.0})
        if "error" in theirs:
            raise SystemExit(f"dynamax check failed: {theirs['error']}")
        for ours_method in ("sequential", "parallel"):
            with torch.no_grad():
                ours = kalman_smoother(**model, method=ours_method)
            errors = {
                "log Z": (ours.log_normalizer - torch.tensor(theirs["log_z"][0], dtype=f64)).abs(),
                "smoothed means": (
                    ours.smoothed_means - torch.tensor(theirs["smoothed_means"], dtype=f64)
                ).abs(),
                "smoothed covariances": (
                    ours.smoothed_covs - torch.tensor(theirs["smoothed_covariances"], dtype=f64)
                ).abs(),
            }
            worst = {k: v.max().item() for k, v in errors.items()}
            text = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
            print(f"check T=50: pvae {ours_method} vs dynamax {method} (no boost): {text}")
            if max(worst.values()) > tolerance:
                raise SystemExit(f"pvae and dynamax differ by more than {tolerance:g}")


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


def interleaved_blocks(
    ours: Callable, peer: DynamaxProcess | None, methods: list[str], budget_s: float, rounds: int
) -> dict[str, list[float]]:
    """Per-call CPU seconds of pvae (``"pvae"``) and each peer method, in alternating blocks.

    pvae is warmed up once; its first call sets the block size k (about 0.25 s of pvae calls,
    1 to 20). Each round times a block of k pvae calls in this process, then a block of k
    calls of each peer method in the worker (already warmed up by its load), the order
    reversed every other round; at least 3 rounds, then until ``budget_s`` of timed calls or
    ``rounds`` rounds.
    """
    start = time.process_time()
    ours()
    first = time.process_time() - start
    k = max(1, min(20, round(0.25 / max(first, 1e-6))))
    times: dict[str, list[float]] = {"pvae": [], **{m: [] for m in methods}}

    def our_block() -> None:
        for _ in range(k):
            start = time.process_time()
            ours()
            times["pvae"].append(time.process_time() - start)

    def peer_block(method: str) -> Callable[[], None]:
        def run() -> None:
            assert peer is not None
            answer = peer.request({"op": "time", "method": method, "k": k})
            if "error" in answer:
                raise SystemExit(f"dynamax worker: {answer['error']}")
            times[method].extend(answer["times"])

        return run

    blocks = [our_block] + [peer_block(m) for m in methods]
    done = 0
    while done < rounds and (done < 3 or sum(map(sum, times.values())) < budget_s):
        for block in blocks if done % 2 == 0 else blocks[::-1]:
            block()
        done += 1
    return times


def ms(values: list[float]) -> tuple[float, float]:
    """(median, min) in milliseconds."""
    return 1e3 * statistics.median(values), 1e3 * min(values)


def main() -> None:
    if "--scaling" in sys.argv[1:]:
        scaling_main([a for a in sys.argv[1:] if a != "--scaling"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T up to 1000")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per cell")
    parser.add_argument("--max-rounds", type=int, default=8, help="most blocks per side per cell")
    parser.add_argument("--rows", type=int, nargs="+", help="indices into ROWS (default: all)")
    parser.add_argument("--max-t", type=int, default=None, help="skip longer sequences")
    parser.add_argument("--min-t", type=int, default=None, help="skip shorter sequences")
    parser.add_argument(
        "--parallel-peer-max-t",
        type=int,
        default=None,
        help="dynamax's parallel smoother is not compiled for longer sequences (say so)",
    )
    parser.add_argument(
        "--peer-python",
        default=sys.executable,
        help="interpreter that runs the jax-only dynamax worker (default: this one)",
    )
    parser.add_argument(
        "--compile-timeout",
        type=float,
        default=300.0,
        help="seconds allowed for one dynamax compilation; a cell over it is skipped",
    )
    args = parser.parse_args()
    if args.max_rounds < 1 or args.budget < 0:
        raise SystemExit("--max-rounds must be >= 1 and --budget >= 0")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        peer: DynamaxProcess | None = DynamaxProcess(args.peer_python, folder)
        assert peer is not None
        if peer.error is not None:
            print(f"{peer.error}: peer columns skipped (pip install .[bench])")
            peer = None
        else:
            print(f"peer: {peer.versions}, in its own process ({args.peer_python})")
            check_against_dynamax(peer)
        try:
            run_rows(args, peer)
        finally:
            if peer is not None:
                peer.request({"op": "quit"}, timeout_s=5.0)
                peer.close()


def run_rows(args: argparse.Namespace, peer: DynamaxProcess | None) -> None:
    print(f"load average before: {os.getloadavg()}  (1 thread per side, process CPU clocks)")
    print(
        f"{'row':<12} {'method':<10} {'B':>3} {'T':>6} {'pvae ms':>17} {'dynamax ms':>17}"
        f" {'ratio':>6} {'(jit s)':>8} {'peer method':>11} {'load':>5}"
    )
    print(f"{'':<12} {'':<10} {'':>3} {'':>6} {'median / min':>17} {'median / min':>17}")
    for index, (label, method, lengths, batch, grad) in enumerate(ROWS):
        if args.rows is not None and index not in args.rows:
            continue
        for T in lengths:
            if (args.quick and T > 1000) or (args.max_t is not None and T > args.max_t):
                continue
            if args.min_t is not None and T < args.min_t:
                continue
            run_cell(args, peer, label, method, T, batch, grad)
    print(f"load average after: {os.getloadavg()}")


def load(peer: DynamaxProcess, path: str, method: str, grad: bool, timeout_s: float) -> dict:
    """The worker's reply to loading (compiling) ``method`` on the model at ``path``."""
    answer = peer.request(
        {"op": "load", "npz": path, "method": method, "grad": grad}, timeout_s=timeout_s
    )
    if "error" in answer and not answer.get("timeout"):
        raise SystemExit(f"dynamax worker: {answer['error']}")
    return answer


def run_cell(
    args: argparse.Namespace,
    peer: DynamaxProcess | None,
    label: str,
    method: str,
    T: int,
    batch: int,
    grad: bool,
) -> None:
    """One line of the table: load (compile) the peer, then time both sides interleaved."""
    model = make_model(batch, T, torch.float64)
    if batch == 1:
        model["y"] = model["y"][0]
    names = ["sequential", "parallel"] if method == "auto" else [method]
    compile_s: dict[str, float] = {}
    prefix = f"{label:<12} {method:<10} {batch:>3} {T:>6}"
    limit = getattr(args, "parallel_peer_max_t", None)
    if peer is not None and limit is not None and T > limit and "parallel" in names:
        names.remove("parallel")
        print(f"{prefix}  dynamax parallel: not compiled above T = {limit} (--parallel-peer-max-t)")
    if peer is not None:
        with torch.no_grad():
            ours = kalman_smoother(**model, method=method).log_normalizer
        path = peer.save(model)
        for name in list(names):
            answer = load(peer, path, name, grad, args.compile_timeout)
            if answer.get("timeout"):
                print(
                    f"{prefix}  dynamax {name}: compilation over"
                    f" {args.compile_timeout:.0f} s, skipped",
                    flush=True,
                )
                names.remove(name)
                for done in compile_s:  # the worker was ended: load them again
                    load(peer, path, done, grad, args.compile_timeout)
                continue
            compile_s[name] = answer["compile_s"]
            error = (ours - torch.tensor(answer["log_z"], dtype=ours.dtype).view_as(ours)).abs()
            # dynamax adds 1e-9 to the diagonal of every covariance it solves with
            # (psd_solve), which moves log Z by about 2e-11 a step on this model
            if error.max().item() > 1e-9 * T:
                raise SystemExit(f"log Z differs from dynamax's by {error.max().item():.1e}")
    times = interleaved_blocks(
        pvae_fn(model, method, grad),
        peer,
        names if peer is not None else [],
        args.budget,
        args.max_rounds,
    )
    ours_med, ours_min = ms(times["pvae"])
    peer_cells = {n: ms(times[n]) for n in names} if peer is not None else {}
    if not peer_cells:
        peer_text, ratio, jit, peer_name = "skipped", float("nan"), "", "-"
    else:
        peer_name = min(peer_cells, key=lambda n: peer_cells[n][0])
        peer_med, peer_min = peer_cells[peer_name]
        peer_text = f"{peer_med:.2f} / {peer_min:.2f}"
        ratio, jit = ours_med / peer_med, f"{compile_s[peer_name]:.1f}"
    ours_text = f"{ours_med:.2f} / {ours_min:.2f}"
    print(
        f"{prefix} {ours_text:>17} {peer_text:>17} {ratio:>6.2f} {jit:>8} {peer_name:>11}"
        f" {os.getloadavg()[0]:>5.1f}",
        flush=True,
    )
    if batch == 64 and not grad and method == "auto":
        hmm = pyro_hmm(model, T)
        with torch.no_grad():
            (pyro_ms,) = interleaved_ms([lambda: hmm.log_prob(model["y"])], args.budget, 15)
        print(f"{'':<12} Pyro GaussianHMM.log_prob (filter only) B=64 T={T}: {pyro_ms:.2f} ms")


if __name__ == "__main__":
    main()
