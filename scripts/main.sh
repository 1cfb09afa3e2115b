#!/usr/bin/env bash
# The main job on embedded defaults: set up .venv (as root also the apt packages: Quantum ESPRESSO), start (or
# reuse) the embedded database, ingest the sample runs (../shared/external, else a bundled example) and print what
# the database holds; then build a potential for a periodic solid automatically with real DFT (diamond Si8 with
# Quantum ESPRESSO, PySCF where pw.x is missing), check it against DFT (held-out frames, phonons) and write
# autobuild/report.html (mlmd_lab.autobuild). Exit status 3 when a check fails.
# Extra arguments go to `mlmd-lab demo` (e.g. --samples DIR, --quickstart to add the water quickstart,
# --no-autobuild to only ingest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec mlmd-lab demo "$@"
