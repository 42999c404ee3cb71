"""Every tutorial runs from top to bottom in quick mode.

Each ``tutorials/*.ipynb`` is executed with nbclient in a fresh kernel whose environment has
``PVAE_QUICK=1`` (the notebooks then use tiny budgets); any cell that raises fails the test.
The notebook is executed in memory and the result written under ``tmp_path``: the committed
notebook, with its full-mode outputs, is never rewritten.

Each tutorial states its key facts as checks, ``check(condition, what)``, which prints
``"✓ what"`` or raises: a wrong library stops the notebook. The test counts the printed checks
and fails a notebook that runs none (so checks cannot silently disappear).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
CHECK_MARK = "\u2713 "  # what a passed check prints at the start of its line

# The kernel must be this interpreter (the one that has pvae installed): fail early otherwise.
_CHECK_KERNEL = f"""
import sys
assert sys.executable == {sys.executable!r} or sys.prefix == {sys.prefix!r}, (
    "the notebook kernel runs " + sys.executable + ", not the test interpreter {sys.executable}"
)
"""


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path: Path, tmp_path: Path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(_CHECK_KERNEL))
    # The kernel inherits this process's environment.
    monkeypatch.setenv("PVAE_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    try:
        client.execute()
    finally:
        nbformat.write(notebook, tmp_path / path.name)  # for inspection after a failure
    passed = count_checks(notebook)
    print(f"{path.name}: {passed} checks passed")
    assert passed > 0, f"{path.name} ran no check: every tutorial must check what it states"


def count_checks(notebook) -> int:
    """The number of lines that start with the check mark in the notebook's stream outputs."""
    count = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                count += sum(line.startswith(CHECK_MARK) for line in output["text"].splitlines())
    return count
