#!/usr/bin/env bash
# Start a 2-node SLURM cluster on this one host (tests of runs that span nodes). Idempotent.
#
#   sudo bash launchers/local_slurm_multi.sh          # start it and wait for both nodes
#   sudo bash launchers/local_slurm_multi.sh --stop   # stop its daemons, remove its namespaces
#   SLURM_CONF=/etc/slurm-multi/slurm.conf sinfo      # talk to it (sbatch, squeue, the sweep)
#
# The controller (vsctl) and the nodes (vsn1, vsn2) each run in their own network and UTS
# namespace: their own hostname and address on a bridge (10.77.0.0/24 by default), so a job's
# tasks on vsn1 and vsn2 reach each other over a real network, as on two machines. The Debian
# slurm build has no multiple-slurmd mode (two NodeNames on one NodeHostname are refused), hence
# the namespaces. It is a second cluster beside the one of launchers/local_slurm.sh, which keeps
# running: its own slurm.conf, state, spool, logs and pid files. Each node claims 4 CPUs
# (SlurmdParameters=config_overrides), so a 1-node x 4-task job fits on a 2-core host too.
# Needs root, iproute2 (ip netns), util-linux (unshare) and munge (local_slurm.sh sets it up).
# Environment: SLURM_MULTI_SUBNET (default 10.77.0), SLURM_MULTI_WAIT_S (default 60).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/slurm_common.sh"  # slurm_conf_common

HERE=$(cd "$(dirname "$0")" && pwd)
CONF_DIR=/etc/slurm-multi
CONF=$CONF_DIR/slurm.conf
RUN=/run/slurm-multi
SPOOL=/var/spool/slurm-multi
LOG_DIR=/var/log/slurm
NET=${SLURM_MULTI_SUBNET:-10.77.0}
WAIT_S=${SLURM_MULTI_WAIT_S:-60}
BRIDGE=vsbr0
NODES=(vsn1 vsn2)
declare -A ADDR=([vsctl]=$NET.1 [vsn1]=$NET.11 [vsn2]=$NET.12)

die() { echo "local_slurm_multi.sh: error: $*" >&2; exit 1; }
log() { echo "local_slurm_multi.sh: $*" >&2; }
sinfo_multi() { SLURM_CONF=$CONF timeout 10 sinfo -h -N -o "%N %t" 2>/dev/null || true; }

show_logs() {
  for f in "$LOG_DIR"/multi-*.log; do
    [ -f "$f" ] && { echo "---- tail $f" >&2; tail -n 20 "$f" >&2; }
  done
  return 0
}

write_conf() {
  local mem_mb
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.4}' /proc/meminfo)
  install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$RUN" "$SPOOL/ctld" "$SPOOL/vsn1" "$SPOOL/vsn2"
  cat >"$CONF" <<EOF
# written by vit-scaling launchers/local_slurm_multi.sh
ClusterName=vmulti
SlurmctldHost=vsctl(${ADDR[vsctl]})
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
# job ids of this cluster start here, apart from the one-node cluster's
FirstJobId=500000
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/multi-slurmctld.log
SlurmdLogFile=$LOG_DIR/multi-slurmd-%n.log
$(slurm_conf_common)
# the nodes share this host's cores: take the CPUs below as given
SlurmdParameters=config_overrides
NodeName=vsn1 NodeAddr=${ADDR[vsn1]} CPUs=4 RealMemory=$mem_mb State=UNKNOWN
NodeName=vsn2 NodeAddr=${ADDR[vsn2]} CPUs=4 RealMemory=$mem_mb State=UNKNOWN
PartitionName=multi Nodes=vsn[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 644 "$CONF"
}

make_namespace() {  # NAME: a network namespace with its address on the bridge, its own hosts
  local name=$1 h
  ip netns list | grep -qw "^$name" || ip netns add "$name"
  if ! ip link show "$name-h" >/dev/null 2>&1; then
    ip link add "$name-h" type veth peer name eth0 netns "$name"
    ip link set "$name-h" master "$BRIDGE" up
    ip -n "$name" addr add "${ADDR[$name]}/24" dev eth0
    ip -n "$name" link set eth0 up
    ip -n "$name" link set lo up
  fi
  install -d "/etc/netns/$name"  # in_ns binds it over /etc/hosts
  { echo "127.0.0.1 localhost"; for h in vsctl "${NODES[@]}"; do echo "${ADDR[$h]} $h"; done; } \
    >"/etc/netns/$name/hosts"
}

make_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.254/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  local name
  for name in vsctl "${NODES[@]}"; do make_namespace "$name"; done
}

alive() { local pid; pid=$(cat "$1" 2>/dev/null || true); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

in_ns() {  # NAME CMD...: run CMD in NAME's network namespace, under the hostname NAME, with
  # NAME's hosts file (not `ip netns exec`, which remounts /sys without the cgroup fs slurmd needs)
  local name=$1; shift
  nsenter --net="/run/netns/$name" unshare --uts --mount --propagation slave -- sh -c \
    'hostname "$0" && mount --bind "/etc/netns/$0/hosts" /etc/hosts && exec "$@"' "$name" "$@"
}

start_daemons() {
  local node
  if ! alive "$RUN/slurmctld.pid"; then
    log "starting slurmctld in namespace vsctl"
    in_ns vsctl /usr/sbin/slurmctld -f "$CONF" || { show_logs; die "slurmctld did not start"; }
  fi
  for node in "${NODES[@]}"; do
    if ! alive "$RUN/slurmd-$node.pid"; then
      log "starting slurmd in namespace $node"
      in_ns "$node" /usr/sbin/slurmd -f "$CONF" || { show_logs; die "slurmd $node did not start"; }
    fi
  done
}

stop_all() {
  local f name
  for f in "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid"; do
    if alive "$f"; then
      log "stopping pid $(cat "$f") ($f)"
      kill "$(cat "$f")" || true
      for _ in $(seq 1 20); do alive "$f" || break; sleep 0.5; done
    fi
  done
  for name in "${NODES[@]}" vsctl; do
    ip link del "$name-h" 2>/dev/null || true
    ip netns del "$name" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

wait_idle() {
  local start=$SECONDS states
  while [ $((SECONDS - start)) -lt "$WAIT_S" ]; do
    states=$(sinfo_multi)
    if [ "$(grep -cE ' (idle|mix|alloc|comp)' <<<"$states")" -eq ${#NODES[@]} ]; then
      log "nodes up: $(tr '\n' ' ' <<<"$states")"
      return 0
    fi
    grep -qE ' (down|drain|drng|fail)' <<<"$states" && SLURM_CONF=$CONF \
      scontrol update NodeName=vsn[1-2] State=RESUME >/dev/null 2>&1 || true
    sleep 1
  done
  show_logs
  die "nodes not idle after ${WAIT_S}s (sinfo: '${states:-no answer}')"
}

main() {
  [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, daemons); got uid $(id -u)"
  if [ "${1:-}" = "--stop" ]; then
    stop_all
    return 0
  fi
  if ! command -v ip >/dev/null && command -v apt-get >/dev/null; then
    log "installing iproute2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 \
      >/dev/null || true
  fi
  for cmd in ip nsenter unshare; do
    command -v "$cmd" >/dev/null || die "needs $cmd (packages iproute2, util-linux)"
  done
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    bash "$HERE/local_slurm.sh"  # installs slurm and starts munge
  fi
  write_conf
  make_network
  start_daemons
  wait_idle
}

main "$@"
