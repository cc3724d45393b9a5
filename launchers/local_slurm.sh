#!/usr/bin/env bash
# Install and start a one-node SLURM cluster on this host (tests, CI, demos). Idempotent.
#
#   sudo bash launchers/local_slurm.sh          # install if needed, start, wait for the node
#   bash launchers/local_slurm.sh --stop        # stop slurmd and slurmctld (by pid file)
#
# Needs root and a Debian-like system (apt-get). Uses the Debian packages slurmctld, slurmd,
# slurm-client and munge; no systemd (daemons are started directly, as in containers and CI).
# Environment: SLURM_LOCAL_CPUS (default: nproc), SLURM_LOCAL_PARTITION (default: debug),
# SLURM_LOCAL_WAIT_S (default: 60).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/slurm_common.sh"  # slurm_conf_common

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by vit-scaling launchers/local_slurm.sh"
LOG_DIR=/var/log/slurm
HOST=$(hostname -s)
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

die() { echo "local_slurm.sh: error: $*" >&2; exit 1; }
log() { echo "local_slurm.sh: $*" >&2; }

show_logs() {
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
    [ -f "$f" ] && { echo "---- tail $f" >&2; tail -n 30 "$f" >&2; }
  done
  return 0
}

node_state() { timeout 10 sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n 1 || true; }

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged pgrep; do
    command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null 2>&1 \
      || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages (missing: ${missing[*]})"
  command -v apt-get >/dev/null \
    || die "apt-get not found; install slurmctld slurmd slurm-client munge yourself"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge procps \
    >/dev/null
}

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    # 1024 random bits, as mungekey(8) makes by default
    dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
  fi
  for _ in $(seq 1 20); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  show_logs; die "munge does not work (munge -n | unmunge failed)"
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    log "keeping the existing $CONF (not written by this script)"
    return 0
  fi
  local mem_mb
  # 90% of RAM: slurmd drains a node whose configured RealMemory exceeds what it finds
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  install -d -m 0755 "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARKER
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again only after cred_expire seconds (default 120: slurm.conf(5),
# AuthInfo); short here so that a preempted test job resumes at once
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
$(slurm_conf_common)
NodeName=$HOST CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  if ! cmp -s "$tmp" "$CONF" 2>/dev/null; then
    mv "$tmp" "$CONF"
    chmod 644 "$CONF"
    # a changed config needs fresh daemons
    stop_daemons
  else
    rm -f "$tmp"
  fi
}

daemon_pid() {  # the pid of a daemon started from its pid file, if it still runs
  local pid
  pid=$(cat "/run/$1.pid" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
  return 0
}

stop_daemons() {
  local name pid
  for name in slurmd slurmctld; do
    pid=$(daemon_pid "$name")
    if [ -n "$pid" ]; then
      log "stopping $name (pid $pid)"
      kill "$pid" || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    elif pgrep -x "$name" >/dev/null; then
      die "$name runs without /run/$name.pid; stop it yourself, then rerun this script"
    fi
  done
}

start_daemons() {
  if ! pgrep -x slurmctld >/dev/null; then
    log "starting slurmctld"
    /usr/sbin/slurmctld || { show_logs; die "slurmctld did not start"; }
  fi
  if ! pgrep -x slurmd >/dev/null; then
    log "starting slurmd"
    /usr/sbin/slurmd || { show_logs; die "slurmd did not start"; }
  fi
}

wait_idle() {
  local state="" start=$SECONDS
  while [ $((SECONDS - start)) -lt "$WAIT_S" ]; do
    state=$(node_state)
    case "$state" in
      idle*|mix*|alloc*|comp*) log "node $HOST is $state"; return 0 ;;
      down*|drain*|drng*|fail*)
        # e.g. a node left down by an unclean stop: ReturnToService=2 needs a nudge here
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  show_logs
  timeout 10 scontrol show node "$HOST" >&2 || true
  die "node $HOST not idle after ${WAIT_S}s (state: '${state:-no answer from sinfo}')"
}

main() {
  if [ "${1:-}" = "--stop" ]; then
    stop_daemons
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    case "$(node_state)" in
      idle*|mix*|alloc*|comp*) log "already running"; return 0 ;;
    esac
    die "needs root (it installs packages and starts daemons); got uid $(id -u)"
  fi
  install_packages
  start_munge
  write_conf
  start_daemons
  wait_idle
}

main "$@"
