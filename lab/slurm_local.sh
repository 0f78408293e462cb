#!/usr/bin/env bash
# A one-node SLURM on this machine, for the tests of the cluster path (tests/test_real_slurm.py) and for trying
# `bash run_all.sh slurm ...` without a cluster:
#   bash lab/slurm_local.sh [start]   installs it when missing (root, apt-get: Debian's slurmctld, slurmd,
#                                         slurm-client, munge), starts munged, slurmctld and slurmd, waits until the
#                                         node is idle; does nothing when it is already up
#   bash lab/slurm_local.sh stop      stops the daemons it started
#   bash lab/slurm_local.sh status    exit 0 when it is up
# Everything of it lies in $SLURM_LOCAL_DIR (default /var/tmp/slurm-local): slurm.conf, state, spool, logs, pid
# files; /etc/slurm is left alone, so the SLURM commands need SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf (printed).
# Exit codes: 0 up (or stopped); 1 it could not start (the log's last lines are printed); 2 bad usage;
# 3 SLURM is missing and cannot be installed here (not root, no apt-get, or apt-get failed).
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/var/tmp/slurm-local}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
WAIT_S=${SLURM_LOCAL_WAIT_S:-180}
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "slurm_local: $*"; }
fail() { echo "slurm_local: error: $2" >&2; exit "$1"; }

alive() {  # PIDFILE: the process it names runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {  # the node's state as sinfo says it ("idle", "mixed", "down*", ...), empty when no controller answers
  command -v sinfo >/dev/null || return 0
  timeout 10 sinfo -h -N -o %T 2>/dev/null | head -n 1 || true
}

is_up() {  # our daemons run and the node takes jobs ("idle*", not responding, does not count)
  alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]
}

running() {  # NAME: the pid of a process of that name, if one runs (without procps, which a container may lack)
  local comm
  for comm in /proc/[0-9]*/comm; do
    if [ "$(cat "$comm" 2>/dev/null)" = "$1" ]; then basename "$(dirname "$comm")"; return 0; fi
  done
  return 1
}

install() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -gt 0 ] || return 0
  [ "$(id -u)" = 0 ] || fail 3 "${missing[*]} missing, and only root installs them (apt-get install ${PACKAGES[*]})"
  command -v apt-get >/dev/null || fail 3 "${missing[*]} missing, and there is no apt-get here: install SLURM and munge"
  say "installing ${PACKAGES[*]} (apt-get)"
  mkdir -p "$DIR"
  # a container's policy-rc.d stops the packages' services from starting; on systemd they may start and fail
  # without /etc/slurm/slurm.conf, which is harmless: this script starts its own daemons
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${PACKAGES[@]}"; } >"$DIR/apt.log" 2>&1; then
    tail -n 5 "$DIR/apt.log" >&2
    fail 3 "apt-get could not install ${PACKAGES[*]} (log: $DIR/apt.log)"
  fi
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged already answers (the package's service, or an earlier start)
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged
  touch "$DIR/munged.started"
  local i
  for i in $(seq 50); do
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  fail 1 "munged does not answer (log: /var/log/munge/munged.log)"
}

write_conf() {  # FILE
  local host node
  host=$(hostname -s)
  # the node as slurmd sees it (a node declared larger than it is would be drained); memory is not scheduled
  node=$(slurmd -C | head -n 1 | sed -E 's/ RealMemory=[0-9]+//')
  [[ "$node" == "NodeName=$host "* ]] || fail 1 "slurmd -C names another node than hostname -s ($host): $node"
  # cgroup-free plugins (a container may have no writable cgroup tree); ReturnToService=2: a node that was
  # down comes back when its slurmd registers; OverSubscribe=FORCE:4: up to 4 jobs share a CPU, so that jobs which
  # could run together do, and a missing dependency shows (on 2 CPUs, queueing alone would order most jobs)
  cat >"$1" <<EOF
# written by lab/slurm_local.sh: a one-node SLURM on $host
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
KillWait=10
MinJobAge=600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

start() {
  if is_up; then
    if [ "$(id -u)" != 0 ] || { write_conf "$DIR/slurm.conf.new" && cmp -s "$DIR/slurm.conf.new" "$CONF"; }; then
      rm -f "$DIR/slurm.conf.new"
      say "already up ($(node_state)); export SLURM_CONF=$CONF"
      return 0
    fi
    say "the configuration changed (a newer version of this script): restarting"
    stop
  fi
  install
  [ "$(id -u)" = 0 ] || fail 3 "starting SLURM here needs root (its daemons run as root in $DIR)"
  local other
  if other=$(running slurmctld) && ! alive "$DIR/slurmctld.pid"; then
    fail 1 "a slurmctld this script did not start runs here (pid $other): use that SLURM, or stop it first"
  fi
  mkdir -p "$DIR/state" "$DIR/spool"
  start_munge
  write_conf "$CONF"
  rm -f "$DIR/slurm.conf.new"
  alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
  alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
  local waited=0 state
  while ! is_up; do
    state=$(node_state)
    if [ "$waited" -ge "$WAIT_S" ]; then
      tail -n 5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
      fail 1 "the node is not idle after ${WAIT_S} s (sinfo: ${state:-no answer}); logs in $DIR"
    fi
    if [[ "$state" =~ ^(down|drain) ]]; then  # a state saved by an earlier run: the node is back
      scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
    waited=$((waited + 1))
  done
  say "up in ${waited} s ($(node_state)); export SLURM_CONF=$CONF"
}

stop_daemon() {  # NAME: ends the daemon named by $DIR/NAME.pid and waits for it
  local pid i
  alive "$DIR/$1.pid" || return 0
  pid=$(cat "$DIR/$1.pid")
  kill "$pid"
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  fail 1 "$1 (pid $pid) did not end within 20 s"
}

stop() {
  stop_daemon slurmd
  stop_daemon slurmctld
  if [ -e "$DIR/munged.started" ] && alive /run/munge/munged.pid; then
    kill "$(cat /run/munge/munged.pid)"
    rm -f "$DIR/munged.started"
  fi
  say "stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) if is_up; then say "up ($(node_state)); export SLURM_CONF=$CONF"; else say "not up"; exit 1; fi ;;
  *) fail 2 "unknown command '$1'; usage: bash lab/slurm_local.sh [start|stop|status]" ;;
esac
