#!/usr/bin/env bash
# The whole test suite, real components included: set up .venv, lint, run pytest (slow tests too).
# Extra arguments go to pytest (e.g. -m "not slow" for the fast subset, -x, -k NAME).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
exec python -m pytest "$@"
