#!/usr/bin/env bash
# The main job on embedded defaults: set up .venv, start (or reuse) the embedded database, ingest the
# sample runs (../shared/external, else a bundled example) and print what the database holds.
# Extra arguments go to `mlmd-lab demo` (e.g. --samples DIR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec mlmd-lab demo "$@"
