#!/usr/bin/env bash
# The whole test suite, real components included: set up .venv, lint, run pytest (slow tests too).
# Extra arguments go to pytest (e.g. -m "not slow" for the fast subset, -x, -k NAME).
#   MLMD_TEST_WORKERS  pytest-xdist worker processes (default: the CPU count, at most 4; 0 runs in this process)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
# Most slow tests wait on one core (an XLA compile, a DFT process, a browser), so two workers on two cores halve
# the wall time; tests on the one Slurm share a worker (tests/conftest.py).
# The LAMMPS with pair_style hdnnp that this workplace builds (../shared/tools/README.md), unless one is given.
lmp="$ROOT/../shared/tools/lammps/lmp"
if [[ -z "${MLMD_TEST_LAMMPS:-}" && -x "$lmp" ]]; then
    export MLMD_TEST_LAMMPS="$lmp"
fi
# One worker per core: a third worker on 2 cores was measured no faster (2076 s, 177 % CPU, issue 17's note).
workers="${MLMD_TEST_WORKERS:-$(python -c 'import os; print(min(len(os.sched_getaffinity(0)), 4))')}"
# Each worker keeps JAX's single CPU device: the workers already use every core, and per-core devices in each of
# them would only contend (the split over devices has its own test, with MLMD_CPU_DEVICES=3 in a subprocess).
export MLMD_CPU_DEVICES="${MLMD_CPU_DEVICES:-1}"
exec python -m pytest -n "$workers" --dist loadgroup "$@"
