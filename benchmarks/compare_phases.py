"""Where the default ``pvae compare`` spends its time, phase by phase, and the projected total.

The default comparison (MNIST-5k, a 784-200-200-50 MLP VAE, 5 bounds, 64 particles, batches of
20, 10 epochs, the IWAE-64 yardstick after every epoch, log p(x) with K = 5000 on the 500 test
points) is timed here one bound at a time, each phase on its own: a few training epochs (the
projection scales them to the configured epochs), one yardstick evaluation, and every number of
the final evaluation in the order ``pvae compare`` computes them (log p(x) with K = 5000, the
test ELBO and IWAE-64, active units, gradient SNR, log p(x) against K). The log-likelihood phase
is timed twice, with the evaluation's default path and with the estimator's traced path at the
chunking used before (50 test points x 100 particles per run), and the two are compared point
by point (they draw the same random numbers).

Run from the repository root::

    .venv/bin/python benchmarks/compare_phases.py --threads 1 --clock cpu
    .venv/bin/python benchmarks/compare_phases.py --bounds iwae --train-epochs 1 --ll-samples 1000

With ``--replay DIR`` nothing is timed: the tasks of a finished ``pvae compare --run-dir DIR``
(each cell's ``cell.json`` keeps its tasks' seconds and CPU seconds) are replayed in the order
the pool runs them (the trainings in the plan's order, each cell's evaluation queued when its
training ends: the measures, then the log p(x) chunks) on ``--workers`` idle one-thread
processes, from their CPU seconds: what two idle cores give for that run's work, whatever the
load was when it ran. Per cell it prints the training's wall and CPU seconds; a wall time well
above the CPU time is time the process was off the CPU (other processes, or the hypervisor's
steal time on a virtual machine), not work of the bound::

    .venv/bin/python benchmarks/compare_phases.py --replay DIR --workers 2

``--step-cost STEPS`` times each bound's training step instead (:func:`step_costs`: the bounds
interleaved in each of ``--rounds`` rounds; ``--trained DIR`` from a finished run's trained
weights, ``--weights-of FOLDER`` one cell's weights for every bound)::

    .venv/bin/python benchmarks/compare_phases.py --step-cost 40 --rounds 4

On a machine shared with other jobs use one thread and the CPU clock (idle worker threads spin);
``--threads 2 --clock wall`` is the figure for 2 idle cores. Prints the load average, and per
bound the page faults and system seconds of each phase (where the ``resource`` module exists):
tensors of tens of MB are fresh ``mmap``s from glibc's allocator on every run, and the page
faults of touching them cost a quarter or more of a phase.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyro
import torch

import pvae
from pvae.app import compare, runs
from pvae.app.registry import MODELS
from pvae.checkpoint import load_checkpoint, load_parameters
from pvae.diagnostics import count_active, gradient_snr, latent_activity
from pvae.evaluate import as_tensors
from pvae.inference import ELBO, IWAE

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

FAULTS: dict[str, tuple[int, float]] = {}  # phase: (minor page faults, system seconds)


@contextmanager
def faults(phase: str) -> Any:
    """Record the minor page faults and system seconds of the block under ``phase``."""
    if resource is None:
        yield
        return
    before = resource.getrusage(resource.RUSAGE_SELF)
    yield
    after = resource.getrusage(resource.RUSAGE_SELF)
    FAULTS[phase] = (after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bounds", default=",".join(compare.DEFAULT_BOUNDS))
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--train-epochs", type=int, default=1, help="epochs timed per bound")
    parser.add_argument("--epochs", type=int, default=compare.DEFAULTS["epochs"],
                        help="epochs of the comparison projected")  # fmt: skip
    parser.add_argument("--ll-samples", type=int, default=compare.DEFAULTS["ll_samples"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    parser.add_argument("--no-legacy", action="store_true", help="skip the traced-path timing")
    parser.add_argument("--replay", metavar="DIR", help="replay a finished run's tasks instead")
    parser.add_argument("--workers", type=int, default=2, help="processes of the replay")
    parser.add_argument(
        "--step-cost",
        type=int,
        metavar="STEPS",
        help="time STEPS training steps per bound, interleaved, instead",
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds of --step-cost")
    parser.add_argument(
        "--trained", metavar="DIR", help="--step-cost from the trained weights of a finished run"
    )
    parser.add_argument("--weights-of", metavar="FOLDER",
                        help="with --trained: every bound from this cell's weights")  # fmt: skip
    args = parser.parse_args()
    if args.replay is not None:
        print_replay(Path(args.replay), args.workers)
        return
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    bounds = args.bounds.split(",")
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}, "
          f"{args.clock} clock, torch {torch.__version__}, pyro {pyro.__version__}")  # fmt: skip
    config = compare.run_config(args.dataset, epochs=args.train_epochs, yardstick=None,
                                ll_samples=args.ll_samples)  # fmt: skip
    ds = config.load_data()
    if args.step_cost is not None:
        trained = Path(args.trained) if args.trained is not None else None
        costs = step_costs(config, ds, bounds, args.step_cost, args.rounds, clock, trained,
                           args.weights_of)  # fmt: skip
        for bound, ms in costs.items():
            print(f"{bound}: min {min(ms):.1f} ms per step, median {sorted(ms)[len(ms) // 2]:.1f}"
                  f" ({', '.join(f'{m:.1f}' for m in ms)})")  # fmt: skip
        return
    scale = args.epochs / args.train_epochs
    totals: dict[str, float] = {}
    for bound in bounds:
        phases = time_bound(config, ds, bound, clock, legacy=not args.no_legacy)
        line = ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())
        print(f"{bound}: {line} s", flush=True)
        if FAULTS:
            line = ", ".join(f"{k} {n} ({t:.1f} s)" for k, (n, t) in FAULTS.items())
            print(f"  page faults (system seconds): {line}", flush=True)
        for name, seconds in phases.items():
            factor = scale if name in ("train", "yardstick") else 1.0
            totals[name] = totals.get(name, 0.0) + seconds * factor
    per_bound = len(compare.DEFAULT_BOUNDS) / len(bounds)
    print(f"\nprojected for {len(compare.DEFAULT_BOUNDS)} bounds x {args.epochs} epochs "
          f"({args.clock} seconds):")  # fmt: skip
    counted = {k: v * per_bound for k, v in totals.items() if not k.startswith("legacy")}
    for name, seconds in counted.items():
        print(f"  {name:>12}: {seconds:7.1f}")
    print(f"  {'total':>12}: {sum(counted.values()):7.1f}")
    if "legacy_ll" in totals:
        before = sum(counted.values()) - counted["ll"] + totals["legacy_ll"] * per_bound
        print(f"  with the previous log p(x) path ({totals['legacy_ll'] * per_bound:.1f} s for "
              f"log p(x)): {before:.1f}")  # fmt: skip


def step_costs(
    config: runs.RunConfig,
    ds: Any,
    bounds: Sequence[str],
    steps: int,
    rounds: int,
    clock: Callable[[], float],
    trained: Path | None = None,
    weights_of: str | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per training step of each bound (what a cell's training step runs: the
    bound's engine on the comparison's model, batches of ``config.batch_size``, Adam at
    ``config.lr``), ``steps`` steps after 3 of warm-up, the bounds interleaved in each of
    ``rounds`` rounds so that load drifts touch them alike. From the initial weights, or with
    ``trained`` (a finished run's folder) from each bound's trained weights (``weights_of``: one
    cell folder's weights for every bound)."""
    x, size = as_tensors(ds.train)[0], config.batch_size
    costs: dict[str, list[float]] = {bound: [] for bound in bounds}
    with pyro.validation_enabled(False):
        for _ in range(rounds):
            for bound in bounds:
                pyro.clear_param_store()
                pyro.set_rng_seed(0)
                model = config.build_model(ds)
                engine = config.build_engine(bound)
                engine.loss(model.model, model.guide, x[:size])  # the parameters, created
                if trained is not None:
                    spec = compare.resolve_bounds([bound], config.particles)[0]
                    folder = weights_of or compare.bound_folder(spec)
                    state = load_checkpoint(trained / folder / "checkpoint.pt")
                    with warnings.catch_warnings():  # the pair's warnings, seen in training
                        warnings.simplefilter("ignore")
                        load_parameters(model.model, model.guide, (x[:2],), state)
                params = [p.unconstrained() for p in pyro.get_param_store().values()]
                optimizer = torch.optim.Adam(params, lr=config.lr)
                began = 0.0
                for step in range(steps + 3):
                    if step == 3:
                        began = clock()
                    start = (step % (x.shape[0] // size)) * size
                    engine.train_step(model.model, model.guide, x[start : start + size])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                costs[bound].append((clock() - began) / steps * 1e3)
    return costs


def time_bound(
    config: runs.RunConfig, ds: Any, bound: str, clock: Callable[[], float], legacy: bool
) -> dict[str, float]:
    """Seconds of each phase for one bound (training for ``config.epochs`` epochs)."""
    phases: dict[str, float] = {}
    with pyro.validation_enabled(False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = config.build_model(ds)
        began = clock()
        with faults("train"):
            pvae.fit(model.model, model.guide, ds.train, engine=config.build_engine(bound),
                     epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                     valid=ds.valid, seed=0, progress=False)  # fmt: skip
        phases["train"] = clock() - began
        model.eval()
        valid = tuple(t[: compare.YARDSTICK_POINTS] for t in as_tensors(ds.valid))
        with torch.no_grad():
            began = clock()
            pvae.evaluate_bound(model.model, model.guide, valid, IWAE(64), compare.EVAL_BATCH)
            phases["yardstick"] = clock() - began
        test, k = ds.test, int(config.ll_samples)
        torch.manual_seed(0)
        began = clock()
        with faults("ll"):
            ll = compare.log_likelihood(model, test, k)
        phases["ll"] = clock() - began
        with torch.no_grad():
            began = clock()
            pvae.evaluate_bound(model.model, model.guide, test, ELBO(16), compare.EVAL_BATCH)
            pvae.evaluate_bound(model.model, model.guide, test, IWAE(64), compare.EVAL_BATCH)
            phases["elbo+iwae64"] = clock() - began
        began = clock()
        channels = MODELS[config.model].channels
        count_active(latent_activity(model, test, 0, channels=channels))
        phases["active"] = clock() - began
        began = clock()
        with faults("snr"):
            snr_batch = tuple(t[: compare.SNR_POINTS] for t in as_tensors(test))
            repeats = int(config.snr_repeats or compare.DEFAULTS["snr_repeats"])
            engine = config.build_engine(bound)
            gradient_snr(model.model, model.guide, snr_batch, engine, num_repeats=repeats)
        phases["snr"] = clock() - began
        began = clock()
        compare._ll_vs_k(model, test, compare.ll_ks(k)[:-1], 0)
        phases["ll_vs_k"] = clock() - began
        if legacy:
            torch.manual_seed(0)
            began = clock()
            with faults("legacy_ll"):
                old = _legacy_log_likelihood(model, test, k)
            phases["legacy_ll"] = clock() - began
            gap = float((old.double() - ll.double()).abs().max())
            mean, before = float(ll.double().mean()), float(old.double().mean())
            print(f"  {bound}: log p(x) {mean:.4f} (previous path {before:.4f}, largest "
                  f"per-point difference {gap:.2e})")  # fmt: skip
    return phases


# --------------------------------------------------------------------------------------------
# Replay of a finished run's tasks

Tasks = dict[str, float]  # a cell's tasks by name ("train", "measures", "ll-<start>"): seconds


def evaluation_order(tasks: Mapping[str, float]) -> list[str]:
    """A cell's evaluation tasks in the order the pool queues them: the measures, then the
    log p(x) chunks by their first test point (``pvae.app.compare.evaluation_tasks``)."""
    chunks = sorted((name for name in tasks if name.startswith("ll-")), key=lambda n: int(n[3:]))
    return [name for name in ("measures",) if name in tasks] + chunks


def replay(cells: Sequence[Tasks], workers: int = 2) -> float:
    """The seconds ``workers`` idle processes take to run the tasks of ``cells`` (in plan
    order) as ``pvae compare``'s pool runs them: every training queued first, in order; when
    a training ends, its cell's evaluation tasks (:func:`evaluation_order`) join the end of the
    queue; a free process takes the first task queued (the earliest free process first).

    :raises ValueError: ``workers`` below 1, or a cell without a ``"train"`` task.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    for index, tasks in enumerate(cells):
        if "train" not in tasks:
            raise ValueError(f"cell {index} has no 'train' task: {sorted(tasks)}")
    queue: list[tuple[int, str]] = [(index, "train") for index in range(len(cells))]
    free = [(0.0, worker) for worker in range(workers)]
    running: list[tuple[float, int, int, str]] = []  # (end, worker, cell, task)
    now = 0.0  # the time of the last task's end: a task queued then cannot start before it
    while queue or running:
        while queue and free:
            idle, worker = heapq.heappop(free)
            cell, name = queue.pop(0)
            start = max(idle, now)
            heapq.heappush(running, (start + cells[cell][name], worker, cell, name))
        now, worker, cell, name = heapq.heappop(running)
        heapq.heappush(free, (now, worker))
        if name == "train":
            queue += [(cell, task) for task in evaluation_order(cells[cell])]
    return now


def read_run(folder: Path) -> list[tuple[str, dict[str, dict[str, float]]]]:
    """The cells of a finished ``pvae compare --run-dir`` folder, in plan order (the rows of its
    ``results.json``): ``(cell folder, {task: {"seconds": s, "cpu_seconds": s}})``.

    :raises FileNotFoundError: no ``results.json`` or a cell without its ``cell.json``.
    """
    rows = json.loads((folder / "results.json").read_text())["results"]
    cells = []
    for row in rows:
        document = json.loads((folder / row["folder"] / "cell.json").read_text())
        cells.append((row["folder"], document["tasks"]))
    return cells


def print_replay(folder: Path, workers: int) -> None:
    """Per cell its training's wall and CPU seconds and its evaluation's CPU seconds; the sum,
    and :func:`replay` of the CPU seconds on ``workers`` processes."""
    cells = read_run(folder)
    summary = json.loads((folder / "results.json").read_text())
    print(f"{folder}: {len(cells)} cells, compare's own clock {summary['elapsed_seconds']:.1f} s")
    for name, tasks in cells:
        train = tasks["train"]
        evaluation = sum(t["cpu_seconds"] for task, t in tasks.items() if task != "train")
        print(f"  {name:>12}: training {train['seconds']:.1f} s wall, {train['cpu_seconds']:.1f} "
              f"s CPU; evaluation {evaluation:.1f} s CPU")  # fmt: skip
    cpu = [{task: t["cpu_seconds"] for task, t in tasks.items()} for _, tasks in cells]
    total = sum(sum(tasks.values()) for tasks in cpu)
    print(f"tasks: {total:.1f} s CPU in all; replayed on {workers} idle one-thread processes "
          f"{replay(cpu, workers):.1f} s (the sum / {workers}: {total / workers:.1f} s), plus "
          "what runs outside the pool (imports, data, checks, the report)")  # fmt: skip


def _legacy_log_likelihood(model: Any, test: Any, k: int) -> torch.Tensor:
    """The evaluation before this benchmark's changes: the traced estimator on tenths of the
    test points (at most 100) with 100 particles per vectorised run."""
    n = as_tensors(test)[0].shape[0]
    step = max(1, min(100, math.ceil(n / 10)))
    parts = [
        pvae.log_likelihood(
            model.model,
            model.guide,
            runs.rows(test, start, start + step),
            num_samples=k,
            batch_size=step,
            chunk_size=min(k, 100),
            reuse_guide=False,
        )  # fmt: skip
        for start in range(0, n, step)
    ]
    return torch.cat(parts)


if __name__ == "__main__":
    main()
