"""Every tutorial notebook, executed for real: a Jupyter kernel (ipykernel, started by nbclient) runs each notebook
top to bottom in a fresh copy of the notebooks folder, against the test database server and the sample data.

- Environment of the kernel: ``MLMD_MONGODB_URI`` (the session's server), ``MLMD_NOTEBOOK_DB`` (a database of its
  own, dropped afterwards), ``MLMD_SAMPLE_DATA`` (``../shared/external``; the notebooks fall back to a bundled
  example without it), ``MLMD_CLUSTER_CONFIG`` (a throw-away profiles file, never the user's).
- A failing cell fails the test with the cell's number, its source and the error with its traceback; so does a
  traceback printed on stderr (e.g. by a widget's background thread) although the cell itself succeeded.
- Wall time per notebook is printed and written to ``test-artifacts/notebooks.json`` (name -> seconds), the executed
  notebooks (with outputs) to ``test-artifacts/notebooks/``. No wall time is asserted: the quickstart's 5-minute
  budget is measured by ``benchmarks/bench_quickstart.py`` (a 3x slower machine must not fail the suite).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
from conftest import ARTIFACTS, EXTERNAL, ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: Run elsewhere, as shipped: the quickstart in JupyterLab + Chromium by tests/test_quickstart.py (its physics
#: assertion included), so the suite runs the loop once.
ELSEWHERE = {"00_quickstart.ipynb"}
EXECUTED = [p for p in NOTEBOOKS if p.name not in ELSEWHERE]
#: Shorter runs for the suite, injected after a notebook's cell tagged "parameters" (as papermill does): what the
#: notebooks prove (each cell runs, its checks hold) needs less than a user's tutorial run.
TEST_PARAMETERS = {
    "01_teacher_data.ipynb": {"recycle_epochs": 10},
    "03_training.ipynb": {"time_limit_s": 20, "monitor_time_limit_s": 5, "frame_stride": 32,
                          "monitor_frame_stride": 32},
    "04_md_analysis.ipynb": {"nvt_steps": 60, "nve_steps": 200},
    "07_slhmc.ipynb": {"start_epochs": 20, "learn_trials": 10, "retrain_every": 10, "retrain_epochs": 30,
                       "production_trials": 40, "reference_mc_steps": 2000, "ml_md_steps": 600},
    "08_learn.ipynb": {"max_iterations": 1, "reference_budget": 40, "per_iteration": 3, "committee": 2,
                       "hidden": (4, 4), "max_epochs": 30, "md_steps": 40, "test_frames": 4},
}
#: nbclient's per-cell limit (s): a hang guard with room for a 3x slower machine, not a timing assertion.
CELL_TIMEOUT_S = 1200
TIMINGS = ARTIFACTS / "notebooks.json"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.mark.slow
@pytest.mark.timeout(3000)  # hang guard for a slow machine
@pytest.mark.parametrize("path", EXECUTED, ids=[p.name for p in EXECUTED])
def test_notebook_executes(path: Path, mongo_uri: str, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (a dependency of mlmd_lab)")
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    work = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", work, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    db_name = f"nb_{path.stem[:20]}_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MLMD_MONGODB_URI": mongo_uri, "MLMD_NOTEBOOK_DB": db_name,
           "MLMD_SAMPLE_DATA": str(EXTERNAL), "MLMD_CLUSTER_CONFIG": str(tmp_path / "clusters.toml"),
           "PYTHONUNBUFFERED": "1"}
    notebook = nbformat.read(work / path.name, as_version=4)
    _inject_parameters(notebook, TEST_PARAMETERS.get(path.name, {}), nbformat)
    cell_times: dict[int, float] = {}
    started: dict[str, float | int] = {}

    def cell_start(cell, cell_index: int) -> None:
        started.update(index=cell_index, t=time.perf_counter())

    def cell_executed(cell, cell_index: int, execute_reply) -> None:
        cell_times[cell_index] = time.perf_counter() - float(started.get("t", 0.0))

    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            startup_timeout=120, resources={"metadata": {"path": str(work)}},
                            on_cell_start=cell_start, on_cell_executed=cell_executed)
    failure: BaseException | None = None
    t0 = time.perf_counter()
    try:
        client.execute(env=env)
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        failure = err
    finally:
        seconds = time.perf_counter() - t0
        _record(path.name, seconds, notebook, nbformat)
        _drop_database(mongo_uri, db_name)
    slowest = sorted(cell_times.items(), key=lambda kv: -kv[1])[:3]
    print(f"\n{path.name}: {seconds:.1f} s wall (kernel start included); slowest cells: "
          + ", ".join(f"#{k} {s:.1f} s" for k, s in slowest))

    if failure is not None:
        pytest.fail(_describe_failure(path.name, notebook, int(started.get("index", -1)), failure), pytrace=False)
    printed = _printed_tracebacks(notebook)
    assert not printed, f"{path.name}: a traceback was printed on stderr (a background thread failed?):\n" + printed
    leaked = _credentials_in_outputs(notebook)
    assert not leaked, f"{path.name}: a password is in the saved outputs: cells {leaked}"


#: a URI with a password that is not the redacted "***" (nor the placeholder in messages, "PASSWORD")
_CREDENTIAL = re.compile(r"mongodb(?:\+srv)?://[^:/@\s'\"]+:(?!\*\*\*@|password@|PASSWORD@)[^@\s'\"]+@")


def _credentials_in_outputs(notebook) -> list[int]:
    """Cells whose outputs (text, HTML, widget state) hold a URI with a password in clear."""
    return [k for k, cell in enumerate(notebook.cells)
            if _CREDENTIAL.search(json.dumps(cell.get("outputs", [])).replace("\\/", "/"))]


def _inject_parameters(notebook, values: dict, nbformat) -> None:
    """Put ``name = value`` lines in a new cell after the one tagged "parameters" (which must exist and define
    every name, so a renamed parameter fails here rather than silently running the long version)."""
    if not values:
        return
    tagged = [k for k, c in enumerate(notebook.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    defined = notebook.cells[tagged[0]].source
    missing = [name for name in values if not re.search(rf"^{name}\s*=", defined, re.M)]
    assert not missing, f"the parameters cell does not define {missing}"
    lines = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(f"# injected by tests/test_notebooks.py\n{lines}"))


def _describe_failure(name: str, notebook, index: int, error: BaseException) -> str:
    """The failing cell's number and source and the error with its traceback (ANSI colours removed)."""
    cell = notebook.cells[index] if 0 <= index < len(notebook.cells) else None
    source = cell.source if cell is not None else "(unknown cell)"
    detail = str(error)
    if cell is not None:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                detail = f"{out['ename']}: {out['evalue']}\n" + "\n".join(out.get("traceback", []))
    if type(error).__name__ != "CellExecutionError":
        detail = f"{type(error).__name__}: {error}\n{detail}"
    detail = _ANSI.sub("", detail)
    return (f"{name}: cell {index} failed\n---- cell source ----\n{source}\n---- error ----\n"
            f"{detail[-6000:]}")


def _printed_tracebacks(notebook) -> str:
    texts = []
    for k, cell in enumerate(notebook.cells):
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            if "Traceback (most recent call last)" in text:
                texts.append(f"cell {k}:\n{_ANSI.sub('', text)[-3000:]}")
    return "\n".join(texts)


def _record(name: str, seconds: float, notebook, nbformat) -> None:
    """name -> seconds into test-artifacts/notebooks.json (merged with earlier runs); the executed notebook beside."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        timings = json.loads(TIMINGS.read_text())
    except (OSError, ValueError):
        timings = {}
    timings[name] = round(seconds, 1)
    TIMINGS.write_text(json.dumps(dict(sorted(timings.items())), indent=2) + "\n")
    executed = ARTIFACTS / "notebooks" / name
    executed.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, executed)


def _drop_database(uri: str, name: str) -> None:
    import mlmd_lab

    database = mlmd_lab.connect(uri, database=name)
    database.drop()
    database.close()


def test_notebooks_are_saved_without_outputs() -> None:
    """The repository keeps notebooks small: no outputs, no execution counts."""
    import nbformat

    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        dirty = [k for k, c in enumerate(notebook.cells)
                 if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
        assert not dirty, f"{path.name}: cells {dirty} have saved outputs; clear them before committing"


def test_notebooks_use_their_own_database() -> None:
    """Every notebook that connects reads the database name from MLMD_NOTEBOOK_DB (so tests never touch yours)."""
    for path in NOTEBOOKS:
        text = path.read_text()
        if "connect(" in text:
            assert "MLMD_NOTEBOOK_DB" in text, (
                f"{path.name} connects without os.environ.get('MLMD_NOTEBOOK_DB', 'tutorial')")
