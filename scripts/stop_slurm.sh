#!/usr/bin/env bash
# Stop the single-node Slurm started by scripts/start_slurm.sh: slurmd, slurmctld, then munged.
#   scripts/stop_slurm.sh            # stop all three
#   scripts/stop_slurm.sh --keep-munge
# Idempotent: daemons that do not run are skipped. Prints what it did.
set -uo pipefail

keep_munge=no
[ "${1:-}" = "--keep-munge" ] && keep_munge=yes

stop() {  # stop NAME PIDFILE
  local name=$1 pidfile=$2 pid
  if [ -s "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "[stop_slurm] $name (pid $pid) still running after 10 s" >&2
    else
      echo "[stop_slurm] stopped $name (pid $pid)"
    fi
  else
    echo "[stop_slurm] $name not running"
  fi
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
if [ "$keep_munge" = no ]; then
  stop munged /run/munge/munged.pid
fi
