#!/usr/bin/env bash
# Start a single-node Slurm (Debian 12, slurm-wlm 22.05) without systemd, for CI and the real-scheduler tests.
#
#   sudo scripts/start_slurm.sh          # as root; prints what it did, ends with `sinfo`
#
# Needs (see scripts/apt-packages.txt; install them BEFORE starting daemons: reinstalling munge while munged
# runs deletes /run/munge):
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge slurm-wlm-torque
#
#   sudo scripts/start_slurm.sh --force  # rewrite slurm.conf and restart the daemons even if Slurm runs
#
# Idempotent: when slurmctld and slurmd already run and the node is usable (idle/mix/alloc), it does nothing
# (whoever started them keeps their slurm.conf; running jobs are not disturbed). Otherwise it writes slurm.conf,
# (re)starts what is not running and resumes a down/drained node.
# Environment:
#   SLURM_CI_CPUS     CPUs the node declares (default 4; may exceed the real cores thanks to config_overrides)
#   SLURM_CI_MEM_MB   memory the node declares in MB (default 8000)
# Stop with scripts/stop_slurm.sh. Logs: /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log.
set -euo pipefail

say() { echo "[start_slurm] $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "[start_slurm] must run as root (starts munged, slurmctld and slurmd)" >&2; exit 2
fi
for exe in munged slurmctld slurmd sinfo; do
  command -v "$exe" >/dev/null 2>&1 || [ -x "/usr/sbin/$exe" ] || {
    echo "[start_slurm] $exe not found: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
    exit 2; }
done

force=no
[ "${1:-}" = "--force" ] && force=yes

HOST=$(hostname -s)
NCPU=${SLURM_CI_CPUS:-4}
MEM=${SLURM_CI_MEM_MB:-8000}

alive() {  # alive PIDFILE: the daemon recorded in PIDFILE runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}
node_usable() {
  sinfo -h -o '%t' 2>/dev/null | grep -q -E '^(idle|mix|alloc)'
}

# --- munge ---
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  say "created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if munge -n >/dev/null 2>&1; then
  say "munged already running"
else
  runuser -u munge -- /usr/sbin/munged   # daemonizes; pid in /run/munge/munged.pid
  say "started munged"
fi
munge -n | unmunge >/dev/null                 # sanity check

# --- slurm.conf ---
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
install -d /etc/slurm
new_conf=$(mktemp)
trap 'rm -f "$new_conf"' EXIT
cat > "$new_conf" <<CONF
# Written by mlmd_lab scripts/start_slurm.sh (single-node CI Slurm, no systemd)
ClusterName=ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerParameters=sched_interval=2
DefMemPerCPU=500
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

settings() { grep -v -E '^[[:space:]]*(#|$)' "$1" 2>/dev/null; }   # slurm.conf without comments/blank lines
same_conf=no
if [ -f /etc/slurm/slurm.conf ] && [ "$(settings "$new_conf")" = "$(settings /etc/slurm/slurm.conf)" ]; then
  same_conf=yes
fi

if [ "$force" = no ] && alive /run/slurmctld.pid && alive /run/slurmd.pid && node_usable; then
  if [ "$same_conf" = yes ]; then
    say "slurmctld and slurmd already running with this slurm.conf, node usable: nothing to do"
  else
    say "slurmctld and slurmd already running (their slurm.conf differs from this script's), node usable:" \
        "nothing to do (--force rewrites it and restarts them)"
  fi
  sinfo
  exit 0
fi

if [ "$same_conf" = no ] || [ "$force" = yes ]; then
  cp "$new_conf" /etc/slurm/slurm.conf
  chmod 644 /etc/slurm/slurm.conf
  say "wrote /etc/slurm/slurm.conf (node ${HOST}: CPUs=${NCPU} RealMemory=${MEM} MB, partition debug)"
fi

stop_daemon() {  # stop_daemon NAME PIDFILE
  if alive "$2"; then
    local pid; pid=$(cat "$2")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    say "stopped $1 (pid $pid) to restart it with the current slurm.conf"
  fi
}
start_daemon() {  # start_daemon NAME PIDFILE
  if alive "$2"; then
    say "$1 already running (pid $(cat "$2"))"
  else
    "/usr/sbin/$1"                          # daemonizes, pid in PIDFILE
    say "started $1"
  fi
}

if [ "$same_conf" = no ] || [ "$force" = yes ]; then
  # (also covers daemons a package postinst started with another configuration)
  stop_daemon slurmctld /run/slurmctld.pid
  stop_daemon slurmd /run/slurmd.pid
fi
start_daemon slurmctld /run/slurmctld.pid
start_daemon slurmd /run/slurmd.pid

for _ in $(seq 1 60); do
  node_usable && break
  state=$(sinfo -h -o '%t' 2>/dev/null | head -n1 || true)
  case "$state" in
    down*|drain*|drng*|fail*)
      scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 && say "resumed node $HOST (was $state)" || true ;;
  esac
  sleep 0.5
done
if ! node_usable; then
  sinfo >&2 || true
  echo "[start_slurm] node did not become idle within 30 s; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
  exit 1
fi
say "node ${HOST} ready"
sinfo
