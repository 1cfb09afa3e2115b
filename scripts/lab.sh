#!/usr/bin/env bash
# Open JupyterLab on the tutorial notebooks (notebooks/), with the embedded teacher-data database running.
# Extra arguments go to `mlmd-lab lab` (e.g. --port 8890, --no-browser, --ip 0.0.0.0 on a trusted network).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec mlmd-lab lab "$@"
