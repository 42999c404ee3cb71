"""Shared parts of the paper reproductions: flags, seeds, mean and standard error, verdicts,
the Markdown/JSON report and the budget curve.

Every script in this folder imports this module as ``_common`` (running
``python benchmarks/papers/<script>.py`` puts the folder on ``sys.path``). A script states its
sizes once per budget with :func:`pick`; every budget then runs the same code.

- ``--budget tiny``: seconds (what the test suite runs); ``cpu``: at most 15 minutes on 2 CPU
  cores (what the README's numbers come from); ``paper``: the paper's settings, for a GPU.
- ``--seeds N``: seeds ``0 .. N-1`` (default 2 at tiny, 3 otherwise).
- ``--out DIR``: where ``<name>.md``, ``<name>.json`` (and a budget curve) go; default
  ``benchmarks/papers/results/<script>``.
- ``--threads``: ``torch.set_num_threads``; ``--device cpu|cuda``: where models and data live
  (:func:`to_device`).
- ``--jobs N`` (the scripts that add it with :func:`add_jobs`): the independent runs (seed x
  setting) in N worker processes (:func:`map_runs`), with the numbers of one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pyro
import torch

from pvae.atomic import write_text

BUDGETS = ("tiny", "cpu", "paper")
HERE = Path(__file__).resolve().parent


def parse_args(script: str, doc: str | None, add: Callable | None = None, argv=None):
    """The common flags (plus the script's own, added by ``add(parser)``), checked."""
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/papers/{script}.py",
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--budget", choices=BUDGETS, default="cpu")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    if add is not None:
        add(parser)
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.budget == "tiny" else 3
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use cpu")
    args.device = torch.device(args.device)
    args.out = Path(args.out) if args.out else HERE / "results" / script
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder, got the file {args.out}")
    torch.set_num_threads(args.threads)
    args.script = script
    return args


def add_jobs(parser: argparse.ArgumentParser) -> None:
    """The ``--jobs N`` flag (default 1): worker processes for :func:`map_runs`."""

    def jobs(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"--jobs must be an integer >= 1, got {text!r}")
        return int(text)

    parser.add_argument(
        "--jobs", type=jobs, default=1, help="worker processes for the runs (default 1)"
    )


def map_runs(run: Callable[..., Any], tasks: Sequence[tuple], jobs: int, threads: int) -> list:
    """``[run(*task) for task in tasks]``, in this process, or (``jobs`` > 1) in that many
    spawned worker processes of ``threads`` torch threads each. ``run`` must be a module-level
    function that seeds what it draws, so either way gives the same numbers; each run's
    process CPU seconds are then its worker's."""
    if jobs <= 1 or len(tasks) <= 1:
        return [run(*task) for task in tasks]
    context = get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)
    ) as pool:
        return list(pool.map(run, *zip(*tasks, strict=True)))


def pick(args: argparse.Namespace, tiny: Any, cpu: Any, paper: Any) -> Any:
    """The value for ``args.budget``: the one place where budgets differ (sizes only)."""
    return {"tiny": tiny, "cpu": cpu, "paper": paper}[args.budget]


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor, a dynamically binarised set or a tuple of them on ``device``."""
    from pvae.data import DynamicBinarized

    if isinstance(value, DynamicBinarized):
        return DynamicBinarized(value.probs.to(device))
    if isinstance(value, tuple):
        return tuple(to_device(item, device) for item in value)
    return value.to(device)


def seed_all(seed: int) -> None:
    """A fresh parameter store and every generator seeded."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)


# -- statistics and verdicts ------------------------------------------------------------------


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error over seeds (``None`` with one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def fmt(mean: float | None, se: float | None = None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


def paired_verdict(better: Sequence[float], worse: Sequence[float], paper_gap: float | None):
    """Verdict on "``better`` above ``worse``" from per-seed paired differences.

    Reproduced when the mean difference exceeds twice its standard error (a screen, not a
    test, with 3 seeds); direction reproduced when it is positive but within that; otherwise
    not reproduced. ``paper_gap`` (the paper's difference) is quoted beside ours.
    """
    diffs = [b - w for b, w in zip(better, worse, strict=True)]
    mean, se = mean_se(diffs)
    gap = "" if paper_gap is None else f"; paper's difference {paper_gap:+.2f}"
    detail = f"difference {fmt(mean, se)} over {len(diffs)} seeds{gap}"
    if mean > 0 and se is not None and mean > 2 * se:
        verdict = "reproduced"
    elif mean > 0:
        verdict = "direction reproduced, within seed noise"
    else:
        verdict = "not reproduced"
    if verdict != "not reproduced" and paper_gap is not None and mean < paper_gap:
        verdict += f", gap {paper_gap - mean:.2f} to the paper's difference"
    return verdict, detail


def match_verdict(ours: float, target: float, tolerance: float) -> tuple[str, str]:
    """Reproduced when ``|ours - target| <= tolerance``."""
    gap = ours - target
    detail = f"ours {ours:.3f}, target {target:.3f}, tolerance {tolerance:g}"
    verdict = "reproduced" if abs(gap) <= tolerance else f"not reproduced, off by {gap:+.3f}"
    return verdict, detail


# -- the report -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Torch threads, the CPU model, versions and the load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class Report:
    """Our numbers beside the paper's, the claims' verdicts, and how they were made.

    ``add`` takes one row: a setting, a metric, our per-seed values, and the paper's number
    with its source (table and row), or ``None`` where the paper has none.
    """

    def __init__(self, args: argparse.Namespace, paper: str, seeds: Sequence[int]):
        self.args, self.paper, self.seeds = args, paper, list(seeds)
        self.rows: list[dict[str, Any]] = []
        self.claims: list[dict[str, str]] = []
        self.notes: list[str] = []
        self.files: list[str] = []
        self.start = time.perf_counter()

    def add(self, setting, metric, values, paper=None, source=None, digits=2) -> dict:
        values = [float(v) for v in values]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{setting} / {metric}: a value is not finite: {values}")
        mean, se = mean_se(values)
        row = dict(setting=setting, metric=metric, mean=mean, se=se, values=values)
        row.update(paper=paper, source=source, digits=digits)
        row["gap"] = None if paper is None else mean - paper
        self.rows.append(row)
        return row

    def claim(self, claim: str, verdict: str, detail: str) -> None:
        self.claims.append(dict(claim=claim, verdict=verdict, detail=detail))

    def write(self) -> dict[str, Any]:
        """Write ``<script>.json`` and ``<script>.md`` atomically; print the Markdown."""
        out = dict(
            paper=self.paper,
            script=f"benchmarks/papers/{self.args.script}.py",
            command=" ".join(["python", f"benchmarks/papers/{self.args.script}.py"] + sys.argv[1:]),
            budget=self.args.budget,
            seeds=self.seeds,
            wall_seconds=time.perf_counter() - self.start,
            machine=machine(),
            rows=self.rows,
            claims=self.claims,
            notes=self.notes,
            files=self.files,
        )
        stem = self.args.out / self.args.script
        write_text(stem.with_suffix(".json"), json.dumps(out, indent=2) + "\n")
        text = markdown(out)
        write_text(stem.with_suffix(".md"), text)
        print(text)
        return out


def markdown(out: dict[str, Any]) -> str:
    m = out["machine"]
    lines = [
        f"# {out['paper']}",
        "",
        f"`{out['command']}`: budget {out['budget']}, seeds {out['seeds']}, "
        f"{out['wall_seconds']:.0f} s wall; {m['cpu']} ({m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads, load {m['load_average']}), torch {m['torch']}.",
        "",
        "| setting | metric | ours (mean ± SE) | paper | ours - paper | paper's source |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        d = r["digits"]
        lines.append(
            f"| {r['setting']} | {r['metric']} | {fmt(r['mean'], r['se'], d)} | "
            f"{fmt(r['paper'], None, d)} | {fmt(r['gap'], None, d)} | {r['source'] or '-'} |"
        )
    lines += ["", "| claim | verdict | detail |", "|---|---|---|"]
    lines += [f"| {c['claim']} | **{c['verdict']}** | {c['detail']} |" for c in out["claims"]]
    lines += [""] + [f"- {note}" for note in out["notes"]]
    lines += [f"- file: `{f}`" for f in out["files"]]
    return "\n".join(lines).rstrip() + "\n"


# -- budget curve -----------------------------------------------------------------------------


def checkpoints(epochs: int, count: int = 4) -> list[int]:
    """About ``count`` epochs (0-based), spaced geometrically, ending at the last one."""
    picked = {max(0, round(epochs ** (i / count)) - 1) for i in range(1, count + 1)}
    return sorted(picked | {epochs - 1})


class BudgetCurve:
    """A ``pvae.fit`` callback: the score at a few epochs of the same run, against the
    training seconds so far (the score's own time is not counted, and it runs on a forked
    random stream, so training is unchanged)."""

    def __init__(self, score: Callable[[], float], epochs: Sequence[int]):
        self.score, self.epochs = score, set(epochs)
        self.points: list[dict[str, float]] = []
        self.seconds = 0.0
        self.score_seconds = 0.0  # time spent scoring (not training)

    def __call__(self, run: Any, record: dict[str, Any]) -> None:
        self.seconds += float(record["seconds"])
        if record["epoch"] in self.epochs:
            start = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                value = float(self.score())
            self.score_seconds += time.perf_counter() - start
            self.points.append(dict(epoch=record["epoch"] + 1, seconds=self.seconds, score=value))


def log_px_score(vae: Any, probe: Any, num_samples: int) -> Callable[[], float]:
    """A budget-curve score: the mean log p(x) of ``probe`` under ``vae``'s pair."""
    import pvae

    def score() -> float:
        ll = pvae.log_likelihood(vae.model, vae.guide, probe, num_samples=num_samples)
        return float(ll.mean())

    return score


def fit_with_curve(model, guide, train, engine, score, sizes: dict, seed: int, callbacks=()):
    """``pvae.fit`` for ``sizes["epochs"]`` epochs (batch ``sizes["batch_size"]``, learning
    rate ``sizes.get("lr", 1e-3)``) with a :class:`BudgetCurve` of ``score`` (after the other
    ``callbacks``; at the 1-based epochs ``sizes["curve_epochs"]`` where given, else at
    :func:`checkpoints`); returns the training seconds (without the scoring) and the curve's
    points."""
    import pvae

    at = sizes.get("curve_epochs")
    curve = BudgetCurve(score, checkpoints(sizes["epochs"]) if at is None else [e - 1 for e in at])
    start = time.perf_counter()
    pvae.fit(
        model,
        guide,
        train,
        engine=engine,
        epochs=sizes["epochs"],
        batch_size=sizes["batch_size"],
        lr=sizes.get("lr", 1e-3),
        seed=seed,
        progress=False,
        callbacks=[*callbacks, curve],
    )
    return time.perf_counter() - start - curve.score_seconds, curve.points


def write_curves(
    report: Report, curves: dict[str, list[dict]], ylabel: str, log_y=False, stem="budget_curve"
) -> None:
    """``<stem>.json`` and ``<stem>.png`` in the output folder: one line per label (setting
    and seed), score against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = report.args.out
    write_text(folder / f"{stem}.json", json.dumps(dict(ylabel=ylabel, curves=curves)) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        ax.plot([p["seconds"] for p in points], [p["score"] for p in points], "o-", label=label)
    ax.set_xlabel("training seconds")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    report.files.append(f"{stem}.json")
    save_figure(report, fig, f"{stem}.png")


def save_figure(report: Report, fig: Any, name: str) -> None:
    """``fig`` as ``name`` in the output folder (written whole or not at all), closed, and
    listed in the report."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    report.args.out.mkdir(parents=True, exist_ok=True)
    path = report.args.out / name
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    report.files.append(name)
