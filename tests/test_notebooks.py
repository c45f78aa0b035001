"""Every notebook in `notebooks/` runs top to bottom without an error.

Each notebook runs from a temporary copy of `notebooks/` (so outputs and any files it writes stay
out of the repository) in a `python3` kernel started from this interpreter, with the repository
on `PYTHONPATH` and matplotlib's non-interactive Agg backend as the default. Cells named in
`SHORTER` run with smaller settings (fewer training steps), to keep the suite fast.
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
# Shorter runs for the suite's time budget, as (notebook, text in a cell, replacement): every
# cell still runs; training 150 steps instead of 500 takes ~30 s less on a 2-core CPU.
SHORTER = [("train_and_generate.ipynb", "num_steps = 500\n", "num_steps = 150\n")]


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    work_dir = tmp_path / "notebooks"
    shutil.copytree(path.parent, work_dir, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    nb = nbformat.read(work_dir / path.name, as_version=4)
    for name, text, replacement in SHORTER:
        if name == path.name:
            cells = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
            assert len(cells) == 1, f"{name}: no single cell holds {text!r} any more"
            cells[0].source = cells[0].source.replace(text, replacement)
    # A last cell reports which Python the kernel runs, to check it is this environment's.
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))

    # The kernel process inherits this environment. The notebooks train for a while: there
    # the suite's fast-compile flag (conftest.py) would cost more than it saves.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(
        "--xla_backend_optimization_level=0", "").strip())
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
