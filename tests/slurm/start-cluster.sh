#!/usr/bin/env bash
# Start a one-node SLURM cluster (slurmctld + slurmd on this machine) whose config, state, spool,
# logs and pid files all live under DIR. Installs nothing: needs slurm-wlm and munge
# (`apt-get install -y slurm-wlm munge`) and root (slurmd runs jobs as the submitting user).
#
#   tests/slurm/start-cluster.sh DIR        # prints SLURM_CONF=DIR/slurm.conf on its last line
#   SLURM_CONF=DIR/slurm.conf sinfo         # every SLURM command needs that variable
#   tests/slurm/stop-cluster.sh DIR         # stops what this script started (by PID)
#
# munged: if a munge daemon already answers (`munge -n | unmunge`), it is used; otherwise one is
# started on the standard socket (/run/munge) as the munge user, with a key created if missing,
# and its PID recorded in DIR/munged.pid so stop-cluster.sh stops it too.
#
# Partitions: debug (the default) and gpu, both on the one node (which has no GPU), so that a
# profile's per-rule partition choice can be checked.
#
# Environment: SLURM_TEST_TIMEOUT (seconds to wait for the node to be idle, default 60),
# SLURM_TEST_CTLD_PORT / SLURM_TEST_SLURMD_PORT (default 6817 / 6818), SLURM_TEST_PROCTRACK
# (linuxproc, the default, or cgroup: process tracking as on most production clusters; needs a
# writable cgroup file system).
set -euo pipefail

die() { echo "start-cluster: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR"
[ "$(id -u)" -eq 0 ] || die "must run as root (slurmd starts jobs as the submitting user)"
for exe in slurmctld slurmd munged munge unmunge sinfo; do
  command -v "$exe" >/dev/null 2>&1 || [ -x "/usr/sbin/$exe" ] ||
    die "'$exe' not found; install it with: apt-get install -y slurm-wlm munge"
done
export PATH="$PATH:/usr/sbin:/sbin"

mkdir -p "$1"
DIR=$(cd "$1" && pwd)
CONF="$DIR/slurm.conf"
TIMEOUT=${SLURM_TEST_TIMEOUT:-60}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}
PROCTRACK=${SLURM_TEST_PROCTRACK:-linuxproc}
case "$PROCTRACK" in
  linuxproc|cgroup) ;;
  *) die "SLURM_TEST_PROCTRACK must be linuxproc or cgroup, not '$PROCTRACK'" ;;
esac

for d in slurmctld slurmd; do
  if [ -s "$DIR/$d.pid" ] && kill -0 "$(cat "$DIR/$d.pid")" 2>/dev/null; then
    die "a cluster is already running from $DIR (stop it with tests/slurm/stop-cluster.sh $DIR)"
  fi
done
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"

# On failure, stop whatever this script started (the logs stay in DIR/log).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
trap 'rc=$?; [ $rc -eq 0 ] || "$HERE/stop-cluster.sh" "$DIR" >/dev/null 2>&1; exit $rc' EXIT

# Log tails for error messages.
show_logs() {
  local f
  for f in "$DIR"/log/*.log /var/log/munge/munged.log; do
    [ -f "$f" ] || continue
    echo "----- tail of $f -----" >&2
    tail -n 25 "$f" >&2
  done
}

# ---------------------------------------------------------------------------------------------
# munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  echo "start-cluster: using the munge daemon already running" >&2
else
  id munge >/dev/null 2>&1 || die "there is no 'munge' user; is the munge package installed?"
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  chmod 0700 /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  rm -f /run/munge/munged.pid
  # munged forks into the background and writes its PID file.
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid ||
    { show_logs; die "munged did not start"; }
  for _ in $(seq 50); do
    [ -s /run/munge/munged.pid ] && break
    sleep 0.1
  done
  [ -s /run/munge/munged.pid ] || { show_logs; die "munged wrote no PID file"; }
  cp /run/munge/munged.pid "$DIR/munged.pid"
  munge -n | unmunge >/dev/null || { show_logs; die "munge -n | unmunge failed"; }
fi

# ---------------------------------------------------------------------------------------------
# slurm.conf
# At least 2 CPUs, so that the 2-thread jobs of the tests fit on a 1-CPU machine too.
CPUS=$(nproc)
[ "$CPUS" -ge 2 ] || CPUS=2
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
cat > "$CONF" <<EOF
# One-node test cluster written by tests/slurm/start-cluster.sh; everything lives under $DIR.
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/$PROCTRACK
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# The node is whatever this machine is: trust the numbers below, do not drain on a mismatch.
SlurmdParameters=config_overrides
ReturnToService=2
# No accounting: sacct cannot answer, Snakemake's SLURM executor must poll with squeue, and
# squeue only sees a finished job for MinJobAge seconds: keep finished jobs for an hour.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF
if [ "$PROCTRACK" = cgroup ]; then
  printf 'CgroupPlugin=autodetect\nConstrainCores=no\nConstrainRAMSpace=no\n' > "$DIR/cgroup.conf"
else
  rm -f "$DIR/cgroup.conf"
fi

export SLURM_CONF="$CONF"

# Inside a job, Snakemake's slurm-jobstep executor runs the rule through a nested `srun` with every
# SLURM_* variable but the job's identity removed from its environment, SLURM_CONF included: that
# srun reads the compiled-in /etc/slurm/slurm.conf. Point it at this cluster's config, unless the
# machine has a SLURM configuration of its own (then this script is not for this machine).
ETC_CONF=/etc/slurm/slurm.conf
if [ -L "$ETC_CONF" ] || [ ! -e "$ETC_CONF" ]; then
  old_target=$(readlink "$ETC_CONF" 2>/dev/null || true)
  if [ -n "$old_target" ] && [ "$old_target" != "$CONF" ]; then
    old_dir=$(dirname "$old_target")
    if [ -s "$old_dir/slurmctld.pid" ] && kill -0 "$(cat "$old_dir/slurmctld.pid")" 2>/dev/null; then
      die "$ETC_CONF points to the running test cluster in $old_dir; stop it first:" \
          "tests/slurm/stop-cluster.sh $old_dir"
    fi
  fi
  mkdir -p /etc/slurm
  ln -sfn "$CONF" "$ETC_CONF"
  echo "$ETC_CONF" > "$DIR/etc-link"
else
  die "$ETC_CONF exists and is not a link made by this script: this machine has its own SLURM" \
      "configuration; run the SLURM tests on a machine without one (e.g. CI)"
fi

# ---------------------------------------------------------------------------------------------
# daemons: in the foreground of their own session, so that the recorded PID is the daemon's.
setsid nohup slurmctld -D -i -f "$CONF" > "$DIR/log/slurmctld.out" 2>&1 < /dev/null &
echo $! > "$DIR/slurmctld.pid"
sleep 0.5
kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null ||
  { show_logs; tail -n 20 "$DIR/log/slurmctld.out" >&2; die "slurmctld exited at once"; }
# The machine's host name is not 'localhost': -N names the node as slurm.conf does.
setsid nohup slurmd -D -N localhost -f "$CONF" > "$DIR/log/slurmd.out" 2>&1 < /dev/null &
echo $! > "$DIR/slurmd.pid"

deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
  state=$(sinfo --noheader --nodes=localhost --format=%t 2>/dev/null | head -n 1 || true)
  [ "$state" = "idle" ] && break
  for d in slurmctld slurmd; do
    kill -0 "$(cat "$DIR/$d.pid")" 2>/dev/null ||
      { show_logs; tail -n 20 "$DIR/log/$d.out" >&2; die "$d exited while the node was starting"; }
  done
  if [ "$(date +%s)" -ge "$deadline" ]; then
    show_logs
    die "the node is not idle after ${TIMEOUT}s (sinfo state: '${state:-no answer}')"
  fi
  sleep 0.5
done

echo "start-cluster: node localhost idle ($CPUS CPUs, $MEM_MB MB, proctrack/$PROCTRACK)," \
     "partitions debug (default) and gpu" >&2
echo "SLURM_CONF=$CONF"
