"""Every notebook in `notebooks/` runs top to bottom without an error.

Each notebook runs from a temporary copy of `notebooks/` (so outputs and any files it writes stay
out of the repository) in a `python3` kernel started from this interpreter, with the repository
on `PYTHONPATH` and matplotlib's non-interactive Agg backend as the default.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    work_dir = tmp_path / "notebooks"
    shutil.copytree(path.parent, work_dir, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    nb = nbformat.read(work_dir / path.name, as_version=4)
    # A last cell reports which Python the kernel runs, to check it is this environment's.
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))

    # The kernel process inherits this environment.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH",
                       os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(work_dir)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    nbformat.write(nb, work_dir / path.name)

    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    kernel_prefix = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert kernel_prefix == sys.prefix, (
        f"the python3 kernel ran {kernel_prefix!r}, not this environment ({sys.prefix!r}); "
        "install ipykernel into it")
