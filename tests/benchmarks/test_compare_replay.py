"""``benchmarks/compare_phases.py --replay``: a finished comparison's tasks replayed, from their
CPU seconds, in the order ``pvae compare``'s pool runs them (the projection of what idle cores
give for that run's work)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import compare_phases  # noqa: E402

# Three cells as the pool sees them (seconds); worked by hand on two workers:
#   0-10 W0 trains A; 0-4 W1 trains B, 4-7 C, then B's measures 7-8 and chunk 8-9, C's
#   measures 9-11; at 10 W0 takes C's chunk (10-11); at 11 W0 takes A's measures (11-12) and
#   W1 A's chunk (11-13): 13 s, against 12.5 s for half of the 25 s of work.
CELLS = [
    {"train": 10.0, "measures": 1.0, "ll-0": 2.0},
    {"train": 4.0, "measures": 1.0, "ll-0": 1.0},
    {"train": 3.0, "measures": 2.0, "ll-0": 1.0},
]


def test_replay_on_two_workers_follows_the_pool_order():
    assert compare_phases.replay(CELLS, workers=2) == pytest.approx(13.0)


def test_replay_queues_an_evaluation_behind_the_trainings_submitted_before_it():
    # A and B train 0-4; at 4 C's training (queued first) starts on W0 (4-10) while W1 runs
    # A's evaluation (4-10); B's and then C's follow: 16 s. Evaluations put ahead of the
    # queued training would start C at 10 and end at 19.
    cells = [{"train": 4.0, "measures": 3.0, "ll-0": 3.0}] * 2
    cells.append({"train": 6.0, "measures": 3.0, "ll-0": 3.0})
    assert compare_phases.replay(cells, workers=2) == pytest.approx(16.0)


def test_replay_on_one_worker_is_the_sum_and_more_workers_than_tasks_the_longest_chain():
    assert compare_phases.replay(CELLS, workers=1) == pytest.approx(25.0)
    # every task on its own worker: a cell's evaluation still waits for its training
    assert compare_phases.replay(CELLS, workers=20) == pytest.approx(12.0)


def test_evaluation_order_is_the_measures_then_the_chunks_by_first_point():
    tasks = {"ll-100": 1.0, "train": 1.0, "ll-50": 1.0, "ll-0": 1.0, "measures": 1.0}
    assert compare_phases.evaluation_order(tasks) == ["measures", "ll-0", "ll-50", "ll-100"]


def test_replay_refuses_bad_input():
    with pytest.raises(ValueError, match="workers must be at least 1"):
        compare_phases.replay(CELLS, workers=0)
    with pytest.raises(ValueError, match="no 'train' task"):
        compare_phases.replay([{"measures": 1.0}], workers=2)


def test_print_replay_reads_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = []
    for name, tasks in zip(("a", "b", "c"), CELLS, strict=True):
        (tmp_path / name).mkdir()
        timed = {task: {"seconds": 2 * s if task == "train" else s, "cpu_seconds": s}
                 for task, s in tasks.items()}  # fmt: skip
        (tmp_path / name / "cell.json").write_text(json.dumps({"tasks": timed}))
        rows.append({"folder": name})
    (tmp_path / "results.json").write_text(json.dumps({"results": rows, "elapsed_seconds": 30}))
    compare_phases.print_replay(tmp_path, workers=2)
    out = capsys.readouterr().out
    assert "training 20.0 s wall, 10.0 s CPU; evaluation 3.0 s CPU" in out
    assert "25.0 s CPU in all; replayed on 2 idle one-thread processes 13.0 s" in out


@pytest.mark.slow  # about 9 s on the shared machine (the data, the first traces)
def test_step_costs_times_every_bound_in_every_round():
    from pvae.app import compare

    config = compare.run_config("digits", quick=True, particles=4, z_dim=2, hidden=(8,))
    ds = config.load_data()
    ticks = iter(range(1000))
    costs = compare_phases.step_costs(
        config, ds, ["iwae", "miwae:2x2"], steps=2, rounds=2, clock=lambda: float(next(ticks))
    )
    assert list(costs) == ["iwae", "miwae:2x2"]
    # each round reads the clock twice per bound (before and after its 2 steps): 1 tick / 2
    assert costs == {"iwae": [500.0, 500.0], "miwae:2x2": [500.0, 500.0]}
