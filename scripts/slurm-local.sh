#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for losscc's Slurm tests and for trying
# `losscc search --executor slurm` without a cluster.
#
#   scripts/slurm-local.sh start    install slurm-wlm and munge if missing (Debian, as root),
#                                   write a one-node configuration, start munged, slurmctld
#                                   and slurmd, and wait until the node is idle
#   scripts/slurm-local.sh stop     stop the daemons
#   scripts/slurm-local.sh status   say whether the cluster is up (exit 0 if it is)
#
# State, logs and pid files live under $LOSSCC_SLURM_DIR (default /tmp/losscc-slurm). The
# recipe is the one in TOOLCHAIN.md's last section: accounting is off, so jobs are followed
# with squeue and results are files.
set -euo pipefail

STATE=${LOSSCC_SLURM_DIR:-/tmp/losscc-slurm}
CONF=/etc/slurm/slurm.conf

say() { echo "slurm-local: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        say "this needs root (it installs packages and starts system daemons); run it with sudo"
        exit 1
    fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    say "installing slurm-wlm and munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged
    for _ in $(seq 50); do
        if munge -n | unmunge 2>/dev/null | grep -q "STATUS: *Success"; then
            return
        fi
        sleep 0.1
    done
    say "munged did not come up (munge -n | unmunge does not succeed)"
    exit 1
}

write_config() {
    local host cpus memory
    host=$(hostname)
    cpus=$(nproc)
    memory=$(( $(free -m | awk '/^Mem:/ {print $2}') * 9 / 10 ))
    mkdir -p /etc/slurm "$STATE/spool" "$STATE/state"
    cat > "$CONF" <<EOF
# Written by losscc's scripts/slurm-local.sh: a one-node cluster.
ClusterName=losscc
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=30
KillWait=5
Waittime=0
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

is_up() {
    command -v sinfo >/dev/null && sinfo -h -o "%T" 2>/dev/null | grep -Eq "idle|mixed|allocated"
}

start() {
    need_root
    if is_up; then
        say "already up"
        return
    fi
    install_packages
    start_munge
    write_config
    stop_daemons quietly
    slurmctld
    slurmd
    for _ in $(seq 100); do
        if is_up; then
            say "up: $(sinfo -h -o '%N %T %c CPUs')"
            return
        fi
        sleep 0.2
    done
    say "the node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log"
    exit 1
}

stop_daemons() {
    local pid
    for file in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        if [ -f "$file" ]; then
            pid=$(cat "$file")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            rm -f "$file"
        fi
    done
    [ "${1:-}" = quietly ] || say "stopped"
}

stop() {
    need_root
    stop_daemons
    if [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) if is_up; then say "up"; else say "down"; exit 1; fi ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
