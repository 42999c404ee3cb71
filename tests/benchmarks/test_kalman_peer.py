"""``benchmarks/kalman_scaling.py``'s dynamax side in its own jax-only process
(``benchmarks/dynamax_worker.py``), and ``benchmarks/gp_scaling.py --versus``. No timing is
checked: only that the protocol works, that the exact check holds, and that a row prints.
The tests that need jax and dynamax are skipped when they are absent (``pip install .[bench]``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gp_scaling  # noqa: E402
import kalman_scaling  # noqa: E402

HAS_PEER = all(importlib.util.find_spec(name) is not None for name in ("jax", "dynamax"))
# jax compiles dynamax's sequential smoother in 2-5 s, its parallel one or a batched gradient in
# 10 s to minutes on a loaded machine: these tests compile the sequential smoother only
needs_peer = pytest.mark.skipif(not HAS_PEER, reason="jax and dynamax not installed")


def cell_args(**overrides) -> argparse.Namespace:
    args = dict(budget=0.0, max_rounds=1, compile_timeout=300.0)
    return argparse.Namespace(**{**args, **overrides})


@pytest.mark.skipif(HAS_PEER, reason="jax and dynamax installed: the skip path is not taken")
def test_without_jax_the_worker_says_so_and_the_peer_column_is_skipped(tmp_path, capsys):
    peer = kalman_scaling.DynamaxProcess(sys.executable, str(tmp_path))
    assert peer.error is not None and "not importable" in peer.error
    assert peer.process is None  # the worker has exited
    kalman_scaling.run_cell(cell_args(), None, "smoother", "sequential", 20, 1, False)
    assert "skipped" in capsys.readouterr().out


@pytest.mark.slow
@needs_peer
def test_worker_checks_exactly_and_times_an_interleaved_row(tmp_path, capsys):
    peer = kalman_scaling.DynamaxProcess(sys.executable, str(tmp_path))
    try:
        assert peer.error is None
        # both of pvae's methods against dynamax's sequential smoother: log Z, smoothed
        # means and covariances to 1e-8 (raises SystemExit otherwise)
        kalman_scaling.check_against_dynamax(peer, methods=("sequential",))
        kalman_scaling.run_cell(cell_args(), peer, "smoother", "sequential", 30, 1, False)
        out = capsys.readouterr().out
        assert "pvae sequential vs dynamax sequential (no boost)" in out
        row = out.strip().splitlines()[-1].split()
        assert row[:4] == ["smoother", "sequential", "1", "30"]
        assert row[-2] == "sequential"
        assert float(row[-4]) > 0  # the ratio
        answer = peer.request({"op": "time", "method": "sequential", "k": 2})
        assert len(answer["times"]) == 2
        assert "error" in peer.request({"op": "time", "method": "none", "k": 1})
    finally:
        peer.request({"op": "quit"}, timeout_s=5.0)
        peer.close()


@pytest.mark.slow
@needs_peer
def test_a_compilation_over_the_timeout_is_skipped_and_the_worker_restarted(tmp_path, capsys):
    peer = kalman_scaling.DynamaxProcess(sys.executable, str(tmp_path))
    try:
        kalman_scaling.run_cell(
            cell_args(compile_timeout=1e-3), peer, "smoother", "sequential", 20, 1, False
        )
        out = capsys.readouterr().out
        assert "compilation over" in out and "skipped" in out.splitlines()[-1]
        assert peer.process is None  # ended; the next request starts a fresh worker
        kalman_scaling.run_cell(cell_args(), peer, "smoother", "sequential", 20, 1, False)
        assert "sequential" in capsys.readouterr().out.splitlines()[-1]
    finally:
        peer.request({"op": "quit"}, timeout_s=5.0)
        peer.close()


def test_gp_scaling_versus_prints_the_three_steps_and_their_ratios(capsys):
    gp_scaling.versus([12], repeats=1)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.split()[0] == "12"
    assert "markovian sequential / dense" in line and "markovian parallel / dense" in line


@pytest.mark.slow  # about 11 s: Dynamo traces the two methods
def test_kalman_compile_rows_agree_with_eager_and_print(capsys):
    """``benchmarks/kalman_compile.py`` with Dynamo's ``eager`` backend (tracing without
    Inductor's minutes of compiling): the compiled call returns the eager outputs exactly and
    a row prints per length and method (no timing checked)."""
    import kalman_compile

    rows = kalman_compile.main(["--lengths", "8", "--backend", "eager", "--blocks", "1"])
    assert [(row["T"], row["method"]) for row in rows] == [(8, "parallel"), (8, "sequential")]
    assert all(row["max_diff"] == 0.0 for row in rows), rows
    assert capsys.readouterr().out.count("T=8 ") == 2
