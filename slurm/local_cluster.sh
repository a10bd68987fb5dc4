#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost (Debian's slurmctld, slurmd, munge), for tests.
#
#   slurm/local_cluster.sh start    install packages if missing, write configs, start daemons,
#                                   wait until the node is idle; a no-op when already up.
#                                   Exits 1 (with the reason) without root or without the packages:
#                                   `make test` then runs every other test and the Slurm ones skip.
#   slurm/local_cluster.sh stop     cancel all jobs, stop the daemons, leave no processes, and
#                                   remove the cluster's directory
#   slurm/local_cluster.sh status   print sinfo/squeue; exit 0 only when the cluster is up
#
# Everything (configs, a munge key made fresh at every start, the munge socket, state, spool, logs,
# pid files) lives in a private directory made by `mktemp -d` (mode 0700) under
# ${LOCAL_SLURM_TMPDIR:-${TMPDIR:-/tmp}}: no predictable path, no key found lying around is ever used.
# `start` records that directory in a pointer file, one per controller port, in a directory only this
# user can read ($HOME/.cache/guided-ldm, or LOCAL_SLURM_POINTER_DIR); `status` and `stop` read it. Clients find
# the config through SLURM_CONF (printed by `start` and `status`); /etc/slurm/slurm.conf is also pointed
# at it when that file is absent, so plain `sbatch` works in any shell of this user. A private munged
# on its own socket never clashes with a system one.
set -euo pipefail

CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${LOCAL_SLURM_SLURMD_PORT:-6818}"
START_TIMEOUT_S="${LOCAL_SLURM_START_TIMEOUT:-60}"
# Credential lifetime; a requeued job is held this long before it may start again (Slurm's default
# of 120 s would make requeue tests crawl).
CRED_EXPIRE_S="${LOCAL_SLURM_CRED_EXPIRE:-10}"
APT_TIMEOUT_S="${LOCAL_SLURM_APT_TIMEOUT:-900}"
PACKAGES=(slurmctld slurmd slurm-client munge)
SYSTEM_CONF=/etc/slurm/slurm.conf
PARENT_DIR="${LOCAL_SLURM_TMPDIR:-${TMPDIR:-/tmp}}"
STATE_PREFIX=guided-ldm-slurm.
POINTER_DIR="${LOCAL_SLURM_POINTER_DIR:-${HOME:-/root}/.cache/guided-ldm}"
POINTER="$POINTER_DIR/local-slurm-$CTLD_PORT"
export PATH="/usr/sbin:/sbin:$PATH"

log() { echo "local_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

set_state_dir() {  # the paths of the cluster in directory $1 (empty: none)
    STATE_DIR="$1"
    CONF="$STATE_DIR/etc/slurm.conf"
    MUNGE_DIR="$STATE_DIR/munge"
    RUN_DIR="$STATE_DIR/run"
    LOG_DIR="$STATE_DIR/log"
    export SLURM_CONF="$CONF"
}

ours() {  # a directory this script made: our name pattern, owned by us, mode 0700, not a link
    local dir="$1"
    [[ -n "$dir" && "$(basename "$dir")" == "$STATE_PREFIX"?????????? && -d "$dir" && ! -L "$dir" ]] \
        && [[ "$(stat -c '%u %a' "$dir")" == "$(id -u) 700" ]]
}

recorded_state_dir() {  # the directory the pointer file names, if it is still ours; else empty
    local dir=""
    [[ -f "$POINTER" && ! -L "$POINTER" ]] && dir="$(head -n 1 "$POINTER")"
    if ours "$dir"; then echo "$dir"; fi
}

new_state_dir() {
    mkdir -p "$PARENT_DIR"
    set_state_dir "$(mktemp -d "$PARENT_DIR/${STATE_PREFIX}XXXXXXXXXX")"
    chmod 0700 "$STATE_DIR"
    if ((${#MUNGE_DIR} + 20 > 107)); then  # a unix socket path has at most 107 characters
        rmdir "$STATE_DIR"
        die "$PARENT_DIR is too long a path for munged's socket: set LOCAL_SLURM_TMPDIR to a shorter directory"
    fi
    (umask 077 && mkdir -p "$POINTER_DIR")
    chmod 0700 "$POINTER_DIR"
    local tmp
    tmp="$(mktemp "$POINTER_DIR/.pointer.XXXXXX")"
    echo "$STATE_DIR" >"$tmp"
    mv -f "$tmp" "$POINTER"
}

remove_state_dir() {  # the cluster's directory and its pointer, once no daemon uses them
    if ours "$STATE_DIR"; then rm -rf --one-file-system "$STATE_DIR"; fi
    if [[ -f "$POINTER" && "$(head -n 1 "$POINTER")" == "$STATE_DIR" ]]; then rm -f "$POINTER"; fi
}

require_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (slurmd and munged need it); try: sudo $0 $*. Without root, \
make test runs every other test and skips the Slurm ones (pytest -m slurm says why)"
}

daemon_pid() {  # pid from the daemon's pid file while that process is still the daemon, else empty
    local name="$1" pid
    [[ -n "$STATE_DIR" && -s "$RUN_DIR/$name.pid" ]] || return 0
    pid="$(tr -dc '0-9' <"$RUN_DIR/$name.pid")"
    # A stale pid file may name a recycled pid: check the process name before trusting (or killing) it.
    if [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]; then echo "$pid"; fi
}

packages_installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive timeout "$APT_TIMEOUT_S" apt-get install -y -q \
        --no-install-recommends -o DPkg::Lock::Timeout=120 "${PACKAGES[@]}"
}

install_packages() {
    packages_installed && return 0
    command -v apt-get >/dev/null || die "slurm is not installed and apt-get is missing; install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]} with apt-get"
    local apt_log
    apt_log="$(mktemp "$STATE_DIR/apt.XXXXXX.log")"
    # The package lists may be stale or empty on a fresh machine: update only when needed.
    if ! apt_install >"$apt_log" 2>&1; then
        timeout "$APT_TIMEOUT_S" apt-get update -q >>"$apt_log" 2>&1 || true
        apt_install >>"$apt_log" 2>&1 \
            || { tail -n 20 "$apt_log" >&2; die "apt-get install ${PACKAGES[*]} failed (log tail above)"; }
    fi
    packages_installed || die "packages installed but slurmctld/slurmd/sbatch/munged still not on PATH"
}

write_munge_key() {  # a new key at every start, in the fresh private directory
    local key="$MUNGE_DIR/munge.key"
    (umask 377 && dd if=/dev/urandom of="$key" bs=1024 count=1 status=none)
    chmod 0400 "$key"
}

write_slurm_conf() {
    local host cpus
    host="$(hostname -s)"
    cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # nproc obeys OMP_NUM_THREADS, a test env var
    # MinJobAge keeps finished jobs visible to `scontrol show job` for an hour: there is no slurmdbd
    # here, so that is how pipeline.slurm.wait_for learns the final state.
    # SlurmdParameters=config_overrides keeps the node from draining if CPUs differs from hardware.
    # proctrack/pgid (no cgroups needed): linuxproc, which follows parent links, let a batch script's
    # background child outlive a job that requeued itself from a USR1 trap; killpg catches it.
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh; regenerated on every start.
ClusterName=gldm-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket,cred_expire=$CRED_EXPIRE_S
MailProg=/bin/true
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=3600
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

link_system_conf() {
    # Only take /etc/slurm/slurm.conf when nobody else uses it (absent or a dangling link, or ours).
    if [[ ! -e "$SYSTEM_CONF" || "$(readlink "$SYSTEM_CONF")" == "$CONF" ]]; then
        mkdir -p "$(dirname "$SYSTEM_CONF")"
        ln -sfn "$CONF" "$SYSTEM_CONF"
    else
        log "$SYSTEM_CONF exists and is not ours: clients need SLURM_CONF=$CONF"
    fi
}

unlink_system_conf() {
    if [[ -L "$SYSTEM_CONF" && "$(readlink "$SYSTEM_CONF")" == "$CONF" ]]; then rm -f "$SYSTEM_CONF"; fi
}

node_idle() {
    [[ "$(timeout 10 sinfo -h -N -o '%t' 2>/dev/null | head -n 1)" == idle ]]
}

is_up() {
    [[ -n "$(daemon_pid munged)" && -n "$(daemon_pid slurmctld)" && -n "$(daemon_pid slurmd)" ]] \
        && timeout 10 scontrol ping >/dev/null 2>&1
}

fail_start() {
    log "$1; log tails follow"
    local f
    for f in "$LOG_DIR"/munged.log "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log; do
        [[ -f "$f" ]] && { echo "==> $f <==" >&2; tail -n 25 "$f" >&2; }
    done
    exit 1  # the EXIT trap of cmd_start stops the daemons and removes the directory
}

start_daemons() {
    munged --force --socket="$MUNGE_DIR/munge.socket" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$RUN_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || fail_start "munged failed to start"
    # -c: cold start, so jobs of an earlier session never come back.
    slurmctld -c || fail_start "slurmctld failed to start"
    slurmd || fail_start "slurmd failed to start"
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until node_idle; do
        ((SECONDS < deadline)) || fail_start "node not idle after ${START_TIMEOUT_S}s"
        sleep 0.5
    done
}

print_env() {
    echo "export SLURM_CONF=$CONF"
}

cmd_start() {
    require_root start
    [[ -z "${LOCAL_SLURM_DIR:-}" ]] || log "LOCAL_SLURM_DIR is no longer read: the cluster gets a private mktemp -d directory under $PARENT_DIR (LOCAL_SLURM_TMPDIR)"
    set_state_dir "$(recorded_state_dir)"
    if [[ -n "$STATE_DIR" ]]; then
        if is_up; then
            log "already running ($STATE_DIR)"
            print_env
            return 0
        fi
        stop_daemons  # whatever is left of a half-started or crashed cluster, then its directory
        unlink_system_conf
        remove_state_dir
    fi
    new_state_dir
    # Any failure from here on (missing packages, a daemon that does not start) leaves nothing behind.
    trap '[[ -n "${STARTED:-}" ]] || { stop_daemons; unlink_system_conf; remove_state_dir; }' EXIT
    install_packages
    mkdir -p "$STATE_DIR/etc" "$STATE_DIR/state" "$STATE_DIR/spool" "$RUN_DIR" "$LOG_DIR" "$MUNGE_DIR"
    chmod 0700 "$MUNGE_DIR"  # the cluster is root's (SlurmUser=root): nobody else needs the socket
    write_munge_key
    write_slurm_conf
    link_system_conf
    start_daemons
    wait_idle
    STARTED=1
    log "up: node $(hostname -s), $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs, partition debug ($STATE_DIR)"
    print_env
}

cancel_all_jobs() {
    [[ -n "$(daemon_pid slurmctld)" ]] || return 0
    local jobs deadline=$((SECONDS + 30))
    jobs="$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)"
    [[ -z "$jobs" ]] && return 0
    # shellcheck disable=SC2086  # one id per word
    timeout 10 scancel $jobs 2>/dev/null || true
    # Wait for the steps to die so no slurmstepd outlives slurmd.
    while [[ -n "$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)" ]]; do
        ((SECONDS < deadline)) || { log "jobs still alive after 30s"; return 0; }
        sleep 0.5
    done
}

kill_and_wait() {  # SIGTERM the pids, SIGKILL what is left after 10 s
    local pids=("$@") deadline=$((SECONDS + 10)) pid alive
    ((${#pids[@]})) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    while :; do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        ((${#alive[@]})) || return 0
        if ((SECONDS >= deadline)); then
            log "SIGKILL ${alive[*]}"
            kill -9 "${alive[@]}" 2>/dev/null || true
            return 0
        fi
        sleep 0.2
    done
}

stop_daemons() {
    local slurm_pids=() pid
    for pid in "$(daemon_pid slurmctld)" "$(daemon_pid slurmd)"; do
        [[ -n "$pid" ]] && slurm_pids+=("$pid")
    done
    kill_and_wait "${slurm_pids[@]}"
    pid="$(daemon_pid munged)"
    [[ -n "$pid" ]] && kill_and_wait "$pid"
    rm -f "$RUN_DIR"/*.pid
}

cmd_stop() {
    set_state_dir "$(recorded_state_dir)"
    if [[ -z "$STATE_DIR" ]]; then
        log "not running (no cluster recorded in $POINTER)"
        return 0
    fi
    require_root stop
    if [[ -z "$(daemon_pid slurmctld)$(daemon_pid slurmd)$(daemon_pid munged)" ]]; then
        log "not running; removing $STATE_DIR"
    else
        cancel_all_jobs
        stop_daemons
        log "stopped; removing $STATE_DIR"
    fi
    unlink_system_conf
    remove_state_dir
}

cmd_status() {
    set_state_dir "$(recorded_state_dir)"
    if [[ -z "$STATE_DIR" ]] || ! is_up; then
        log "down (${STATE_DIR:-no cluster recorded in $POINTER})"
        return 1
    fi
    sinfo
    squeue
    print_env
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
