#!/usr/bin/env bash
# Stop the one-node cluster that tests/slurm/start-cluster.sh started from DIR: cancel its jobs,
# then stop slurmd, slurmctld and (only if start-cluster.sh started it) munged, each by the PID
# recorded in DIR. Idempotent: a daemon that is not running, or a DIR without PID files, is fine.
#
#   tests/slurm/stop-cluster.sh DIR
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 1; }
[ -d "$1" ] || exit 0
DIR=$(cd "$1" && pwd)
export SLURM_CONF="$DIR/slurm.conf"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pid FILE NAME: SIGTERM, up to 15 s to exit, then SIGKILL; removes FILE.
stop_pid() {
  local file=$1 name=$2 pid
  [ -s "$file" ] || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop-cluster: $name (pid $pid) ignored SIGTERM, sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  rm -f "$file"
}

# Jobs first, while the controller can still cancel them: their slurmstepd processes are not
# children of slurmd and would outlive it.
if alive "$DIR/slurmctld.pid" && [ -f "$SLURM_CONF" ]; then
  jobs=$(timeout 10 squeue --noheader --format=%i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 60); do
      left=$(timeout 10 squeue --noheader --states=PENDING,RUNNING,COMPLETING,SUSPENDED \
               --format=%i 2>/dev/null)
      [ -z "$left" ] && break
      sleep 0.5
    done
  fi
fi

stop_pid "$DIR/slurmd.pid" slurmd
stop_pid "$DIR/slurmctld.pid" slurmctld
stop_pid "$DIR/munged.pid" munged

# The /etc/slurm/slurm.conf link start-cluster.sh made, if it still points here.
if [ -s "$DIR/etc-link" ]; then
  link=$(cat "$DIR/etc-link")
  if [ -L "$link" ] && [ "$(readlink "$link")" = "$SLURM_CONF" ]; then
    rm -f "$link"
  fi
  rm -f "$DIR/etc-link"
fi
exit 0
