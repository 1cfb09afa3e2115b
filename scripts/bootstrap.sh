#!/usr/bin/env bash
# Create or refresh the project virtual environment (.venv) and install what mlmd_lab needs.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run repeatedly (a stamp skips unchanged installs).
#   MLMD_EXTRAS   pip extras to install (default: "test")
#   MLMD_PYTHON   interpreter for the venv (default: python3, must be >= 3.11)
# As root, Debian packages listed in scripts/apt-packages.txt are installed with apt-get (skipped otherwise).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${MLMD_PYTHON:-python3}"
EXTRAS="${MLMD_EXTRAS:-test}"

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "mlmd_lab needs Python >= 3.11; set MLMD_PYTHON to one (found: $("$PY" --version 2>&1))" >&2; exit 2; }

apt_list="$ROOT/scripts/apt-packages.txt"
if [ -s "$apt_list" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=$(grep -v '^\s*#' "$apt_list" | xargs -r -n1 sh -c 'dpkg -s "$0" >/dev/null 2>&1 || echo "$0"')
  if [ -n "$missing" ]; then
    echo "[bootstrap] apt-get install $missing"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/dev/null \
      || echo "[bootstrap] warning: apt-get could not install: $missing (tests needing them will skip)" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || { echo "[bootstrap] creating $VENV"; "$PY" -m venv "$VENV"; }
stamp="$VENV/.mlmd-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/constraints.txt" 2>/dev/null | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing mlmd_lab[$EXTRAS] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  log="$VENV/pip-install.log"
  "$VENV/bin/python" -m pip install -c "$ROOT/scripts/constraints.txt" -e "$ROOT[$EXTRAS]" >"$log" 2>&1 \
    || { tail -n 30 "$log" >&2; echo "[bootstrap] pip install failed; full log: $log" >&2; exit 1; }
  "$VENV/bin/python" -c "import mlmd_lab" || { echo "[bootstrap] install failed" >&2; exit 1; }
  # JupyterLab settings for the venv: no news pop-ups; notebook windowing off (widgets stay alive off screen).
  "$VENV/bin/python" -c "from mlmd_lab.jupyter import install_overrides; install_overrides()"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
