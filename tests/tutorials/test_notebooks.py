"""Every tutorial runs from top to bottom in quick mode.

Each ``tutorials/*.ipynb`` is executed with nbclient in a kernel whose environment has
``PVAE_QUICK=1`` (the notebooks then use tiny budgets); any cell that raises fails the test.
The notebooks of one test process share a kernel (starting one and importing torch, pyro and
pvae costs ~4.5 s of CPU): before each notebook its namespace is emptied (``%reset -f``), the
warning filters, Pyro's parameter store, figures, torch's default dtype and the working directory
reset, so a notebook that leans on another's names still fails; after a failure the kernel is
restarted.
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
from nbclient.util import run_sync  # noqa: E402

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
CHECK_MARK = "\u2713 "  # what a passed check prints at the start of its line

# The kernel must be this interpreter (the one that has pvae installed): fail early otherwise.
# Then the state one notebook could leave to the next is reset (the filters as at the first).
_PRELUDE = f"""
%reset -f
import os, sys, warnings
assert sys.executable == {sys.executable!r} or sys.prefix == {sys.prefix!r}, (
    "the notebook kernel runs " + sys.executable + ", not the test interpreter {sys.executable}"
)
import matplotlib.pyplot, pyro, torch
sys.__dict__.setdefault("_pvae_test_filters", list(warnings.filters))
warnings.filters[:] = sys._pvae_test_filters
matplotlib.pyplot.close("all")
pyro.clear_param_store()
torch.set_default_dtype(torch.float32)
os.chdir({{cwd!r}})
%reset -f
"""


@pytest.fixture(scope="module")
def kernel():
    """A kernel manager with a started kernel, shared by the notebooks of this process."""
    with pytest.MonkeyPatch.context() as patch:
        # The kernel inherits this process's environment.
        patch.setenv("PVAE_QUICK", "1")
        patch.setenv("MPLBACKEND", "Agg")
        starter = nbclient.NotebookClient(nbformat.v4.new_notebook(), kernel_name="python3")
        km = starter.create_kernel_manager()
        starter.start_new_kernel()
        try:
            yield km
        finally:
            starter._cleanup_kernel()


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path: Path, tmp_path: Path, kernel):
    notebook = nbformat.read(path, as_version=4)
    prelude = _PRELUDE.replace("{cwd!r}", repr(str(tmp_path)))  # the working directory
    notebook.cells.insert(0, nbformat.v4.new_code_cell(prelude))
    client = nbclient.NotebookClient(
        notebook, km=kernel, timeout=CELL_TIMEOUT_S, kernel_name="python3"
    )
    try:
        client.execute()
    except BaseException:
        run_sync(kernel.restart_kernel)(now=True)  # the next notebook gets a clean kernel
        raise
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
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
