"""``pvae compare`` as a plan of cells: each (bound, seed) is its own run folder with its
``cell.json``; ``--jobs 2`` and ``--executor ray`` give the same numbers, bit for bit, as the
cells run one after the other; ``--resume`` runs only the unfinished cells; data sets that
know their exact log p(x) report it beside the estimates; long evaluations report progress
also when the output is piped."""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from pvae import data
from pvae.app import cli, compare

TINY = ["compare", "--quick", "--dataset", "digits", "--bounds", "elbo,iwae", "--epochs", "1"]
TINY += ["--particles", "4", "--ll-samples", "4", "--snr-repeats", "2", "--z-dim", "2"]
TINY += ["--hidden", "8", "--threads", "1", "--yardstick", "iwae:4"]
TIMINGS = {"train_seconds", "eval_seconds", "yardstick_seconds", "peak_memory_mb"}
TIMINGS |= {"seconds_per_epoch", "history"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def numbers(run_dir):
    """Every row of results.json without its timings (and each history without seconds)."""
    rows = json.loads((run_dir / "results.json").read_text())["results"]
    kept = []
    for row in rows:
        history = [{k: v for k, v in r.items() if k != "seconds"} for r in row["history"]]
        kept.append({**{k: v for k, v in row.items() if k not in TIMINGS}, "history": history})
    return kept


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sequential")
    assert cli.main([*TINY, "--quiet", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_each_cell_is_a_run_folder_with_its_result(sequential):
    report = numbers(sequential)
    for row in report:
        cell = json.loads((sequential / row["folder"] / compare.CELL).read_text())
        assert cell["result"]["log_likelihood"] == row["log_likelihood"]
        assert (
            len(cell["ll"])
            == json.loads((sequential / "config.json").read_text())["data"]["num_test"]
        )
        assert (sequential / row["folder"] / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_jobs_give_the_sequential_numbers_bit_for_bit(sequential, tmp_path, monkeypatch):
    """``--jobs 2``: the cells in two spawned workers give the sequential numbers, and each
    worker has SIGINT's default action (Ctrl-C ends a worker without a traceback; the main
    process reports the interruption)."""
    real, handlers = compare.workers, set()

    @contextlib.contextmanager
    def watched(config, plan):
        with real(config, plan) as pool:
            yield pool
            assert pool is not None
            handlers.update(pool.submit(signal.getsignal, signal.SIGINT).result() for _ in range(4))

    monkeypatch.setattr(compare, "workers", watched)
    run_dir = tmp_path / "jobs"
    assert cli.main([*TINY, "--quiet", "--jobs", "2", "--run-dir", str(run_dir)]) == 0
    assert numbers(run_dir) == numbers(sequential)
    assert all(math.isfinite(row["log_likelihood"]) for row in numbers(run_dir))
    assert handlers == {signal.SIG_DFL}


@pytest.mark.slow
def test_ray_tasks_give_the_sequential_numbers_bit_for_bit(sequential, tmp_path):
    """The command as a user runs it, in its own process: it starts a local Ray instance
    (RAY_ADDRESS unset) and runs one task per cell (in-process under pytest-xdist, Ray's
    start-up shares the worker's core with the other worker's tests and took 4x longer)."""
    pytest.importorskip("ray")
    run_dir = tmp_path / "ray"
    argv = [*TINY, "--quiet", "--executor", "ray", "--run-dir", str(run_dir)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "pvae.app.arguments", *argv], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert numbers(run_dir) == numbers(sequential)


def test_ray_missing_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    config = compare.run_config("digits", quick=True)
    with pytest.raises(ImportError, match=r'pip install "pyro-vae\[ray\]"'):
        compare._run_ray(config, [], None, lambda *done: None)


def test_resume_runs_only_the_unfinished_cells(sequential, tmp_path, capsys):
    """An interrupted comparison (the first cell finished, the second not started, no report
    yet) continues with the second cell only, and reports the uninterrupted run's numbers;
    a --resume with other arguments is refused, naming them."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(sequential, run_dir)
    shutil.rmtree(run_dir / "iwae")
    for name in compare.OUTPUTS:  # as if interrupted before the second cell
        (run_dir / name).unlink()
    before = (run_dir / "elbo" / compare.CELL).stat().st_mtime_ns
    assert cli.main([*TINY, "--quiet", "--run-dir", str(run_dir)]) == 2
    assert "--resume to continue it" in capsys.readouterr().err
    argv = [*TINY, "--quiet", "--resume", "--run-dir", str(run_dir)]
    assert cli.main([*argv, "--lr", "0.01"]) == 2
    assert "--lr (was 0.001, now 0.01)" in capsys.readouterr().err
    assert cli.main(argv) == 0
    assert (run_dir / "elbo" / compare.CELL).stat().st_mtime_ns == before  # not run again
    assert (run_dir / "iwae" / compare.CELL).is_file()
    assert numbers(run_dir) == numbers(sequential)


def test_resume_continues_an_interrupted_evaluation(sequential, tmp_path, monkeypatch):
    """Interrupted in the second cell's log p(x) (its training, measures and first chunks
    kept as task parts in its folder), a resumed comparison trains nothing and evaluates only
    the chunks left, each seeded from (seed, first point): the uninterrupted numbers."""
    run_dir, real = tmp_path / "evaluation", compare._ll_chunk

    def interrupted(config, task, model, ds):
        if task.cell.bound == "iwae" and task.start >= 50:
            raise KeyboardInterrupt
        return real(config, task, model, ds)

    monkeypatch.setattr(compare, "_ll_chunk", interrupted)
    argv = [*TINY, "--quiet", "--run-dir", str(run_dir)]
    assert cli.main(argv) == 130
    cell = run_dir / "iwae"
    kept = {path.name for path in cell.glob("task-*.json")}
    assert kept == {"task-train.json", "task-measures.json"} | {
        f"task-ll-{start}.json" for start in range(0, 50, 10)
    }
    assert not (cell / compare.CELL).exists() and (run_dir / "elbo" / compare.CELL).is_file()
    started = []

    def counted(config, task, model, ds):
        started.append(task.start)
        return real(config, task, model, ds)

    def no_training(*args, **kwargs):
        raise AssertionError("a trained cell was trained again")

    monkeypatch.setattr(compare, "_ll_chunk", counted)
    monkeypatch.setattr(compare, "_fit_cell", no_training)
    assert cli.main([*argv, "--resume"]) == 0
    assert started == [50, 60, 70, 80, 90]
    assert numbers(run_dir) == numbers(sequential)
    assert not list(cell.glob("task-*.json"))  # folded into cell.json


def test_exact_log_likelihood_beside_every_estimate(tmp_path):
    run_dir = tmp_path / "lg"
    argv = [*TINY, "--quiet", "--dataset", "linear-gaussian", "--run-dir", str(run_dir)]
    assert cli.main(argv) == 0
    config = compare.run_config("linear-gaussian", quick=True)
    ds = config.load_data()
    info = ds.info
    x = ds.test if isinstance(ds.test, torch.Tensor) else ds.test[0]
    exact = float(data.linear_gaussian_log_likelihood(x, info["W"], info["b"], info["noise"])
                  .double().mean())  # fmt: skip
    for row in json.loads((run_dir / "results.json").read_text())["results"]:
        assert row["exact_log_likelihood"] == pytest.approx(exact, rel=1e-12)
        # an importance-sampled estimate lies below the truth up to Monte-Carlo noise
        assert row["log_likelihood"] < exact + 3 * row["log_likelihood_stderr"]
    text = (run_dir / "results.md").read_text()
    assert "exact log p(x)" in text and "exact - ELBO" in text
    assert f"{exact:.2f}" in text


def test_progress_lines_when_piped(tmp_path, capsys):
    run_dir = tmp_path / "piped"
    assert cli.main([*TINY, "--bounds", "elbo", "--run-dir", str(run_dir)]) == 0
    err = capsys.readouterr().err  # not a terminal: lines, not a bar
    assert "log p(x), K=4:" in err and "points (" in err


def test_no_worker_processes_where_the_tasks_run_here_or_on_ray():
    """``compare.workers`` starts processes only for local plans of 2 or more jobs and cells
    (the spawned workers are checked in the ``--jobs 2`` test above)."""
    config = compare.run_config("digits", quick=True, bounds=["elbo", "iwae"])
    for plan in (
        compare.Plan.of(config, jobs=1),
        compare.Plan.of(config, jobs=2, executor="ray"),
        compare.Plan(compare.resolve_bounds(["elbo"], 4), [0], 2),
    ):
        with compare.workers(config, plan) as pool:
            assert pool is None


def test_an_interrupted_comparison_says_what_it_kept(tmp_path):
    """Ctrl-C before anything is written names no cells to resume; after, it names them."""
    stop = KeyboardInterrupt()
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    for folder in (empty, missing):
        assert cli._kept("compare", folder, stop) == f"nothing was written in {folder}"
    (empty / "config.json").write_text("{}")
    said = cli._kept("compare", empty, stop)
    assert "finished cells" in said and "--resume" in said
