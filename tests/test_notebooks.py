"""Tutorial notebooks run top to bottom (their code cells, in a fresh interpreter, against a real server).

Full kernel execution with nbclient and browser checks come with the Jupyter interface work; this keeps
every notebook's code working with the library as it changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# What each notebook must leave behind (relative to its working folder).
PRODUCES = {
    "01_teacher_data.ipynb": "exports/train.xyz",
    "02_potentials.ipynb": "exports/new_potential/input.nn",
}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_code_runs(path, mongo_uri, tmp_path):
    cells = json.loads(path.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    db_name = f"test_nb_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MLMD_MONGODB_URI": mongo_uri, "MLMD_NOTEBOOK_DB": db_name,
           "MLMD_SAMPLE_DATA": str(ROOT / ".." / "shared" / "external")}
    cleanup = f"\nimport mlmd_lab; mlmd_lab.connect(database={db_name!r}).drop()\n"
    result = subprocess.run([sys.executable, "-c", code + cleanup], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / PRODUCES[path.name]).exists(), result.stdout[-2000:]
