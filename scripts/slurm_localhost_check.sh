#!/usr/bin/env bash
# shellcheck disable=SC2317  # stop_daemons runs from a trap
# Check that Trajectome gives the same outputs through Nipype's SLURM plugin as with MultiProc,
# on a one-node Slurm cluster started on this machine (for CI; needs root and Debian/Ubuntu).
#
#   scripts/slurm_localhost_check.sh [BIDS_DIR] [-- extra trajectome options]
#
# BIDS_DIR defaults to bids_examples/ds-ect. Environment:
#   TRAJECTOME   the command to run (default: `trajectome` on PATH). Nipype's SLURM jobs run
#                the same Python (sys.executable), so that venv must be visible from the node:
#                it is here, the node is this machine.
#   CHECK_DIR    where the Slurm state, outputs and work dirs go (default: a new /tmp dir)
#   PLUGIN       SLURM (default) or SLURMGraph. SLURM polls the queue until every job ends, so
#                failures are reported at the end of the run; SLURMGraph submits the whole
#                graph with dependencies and returns at once, so this script waits for the
#                queue to drain and then reruns with dont_resubmit_completed_jobs=true to
#                collect the results.
#   REFERENCE_OUT  compare with these existing MultiProc outputs (same options and thread
#                settings) instead of running MultiProc again; REFERENCE_STATUS is its exit code
# Exit code: 0 outputs identical, 1 they differ or a run failed, 2 Slurm did not come up.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bids=$repo/bids_examples/ds-ect
if [ $# -gt 0 ] && [ "$1" != "--" ]; then bids=$(cd "$1" && pwd); shift; fi
[ "${1:-}" = "--" ] && shift
extra=("$@")
TRAJECTOME=${TRAJECTOME:-trajectome}
PLUGIN=${PLUGIN:-SLURM}
check=${CHECK_DIR:-$(mktemp -d /tmp/trajectome-slurm-check.XXXXXX)}
mkdir -p "$check"
check=$(cd "$check" && pwd)

log() { echo "[$(date +%H:%M:%S)] $*"; }

# ---------------------------------------------------------------- install Slurm and Munge
if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
    log "installing slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge > /dev/null
fi

# ---------------------------------------------------------------- configuration
etc=$check/etc
mkdir -p "$etc" "$check/state" "$check/spool" "$check/log" "$check/munge"
# Not plain `nproc`: it answers OMP_NUM_THREADS when that is set (1 in the image and CI).
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
# Leave 1 GB of the machine's memory to the daemons and this script.
mem_mb=$(awk '/MemTotal/ { printf "%d", $2 / 1024 - 1024 }' /proc/meminfo)
cat > "$etc/slurm.conf" <<EOF
ClusterName=localcheck
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
StateSaveLocation=$check/state
SlurmdSpoolDir=$check/spool
SlurmctldPidFile=$check/slurmctld.pid
SlurmdPidFile=$check/slurmd.pid
SlurmctldLogFile=$check/log/slurmctld.log
SlurmdLogFile=$check/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MinJobAge=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
# Every Slurm command (ours, and Nipype's sbatch/squeue) reads this configuration.
export SLURM_CONF=$etc/slurm.conf
# Nipype's SLURM plugins name each job after $LOGNAME and fail with KeyError without it
# (containers and CI runners often do not set it).
export LOGNAME=${LOGNAME:-$(id -un)}

# ---------------------------------------------------------------- start the daemons
munge_socket=$check/munge/munge.socket
munge_key=$check/munge/munge.key
dd if=/dev/urandom of="$munge_key" bs=1024 count=1 status=none
chmod 0400 "$munge_key"
stop_daemons() {
    log "stopping the daemons"
    local pidfile pid
    for pidfile in "$check/slurmd.pid" "$check/slurmctld.pid" "$check/munge/munged.pid"; do
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2> /dev/null || continue
        # Wait for it to go, so the ports and socket are free for the next check.
        for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.2; done
    done
}
trap stop_daemons EXIT
munged --force --key-file="$munge_key" --socket="$munge_socket" \
    --pid-file="$check/munge/munged.pid" --log-file="$check/log/munged.log" \
    --seed-file="$check/munge/munged.seed"
# Slurm's auth plugin and every client find munged through this socket.
echo "AuthInfo=socket=$munge_socket" >> "$etc/slurm.conf"
slurmctld -f "$etc/slurm.conf" -i
slurmd -f "$etc/slurm.conf" -N localhost

log "waiting for the node to become idle"
for _ in $(seq 60); do
    state=$(sinfo -h -n localhost -o %T 2> /dev/null || true)
    [ "$state" = idle ] && break
    sleep 1
done
if [ "$state" != idle ]; then
    echo "the Slurm node did not become idle (state: '${state:-none}'); logs in $check/log" >&2
    sinfo >&2 || true
    tail -n 20 "$check"/log/*.log >&2 || true
    exit 2
fi
sinfo
# A trivial job first, so a broken Slurm set-up is not mistaken for a Trajectome failure.
# shellcheck disable=SC2016  # $(hostname) expands in the job
if ! timeout 60 sbatch --wait --quiet -o "$check/log/smoke-%j.out" --wrap 'echo ran on $(hostname)'
then
    echo "a trivial sbatch job failed; logs in $check/log" >&2
    exit 2
fi
log "sbatch works: $(cat "$check"/log/smoke-*.out)"

# ---------------------------------------------------------------- the two runs
run() {  # run NAME PLUGIN [plugin KEY=VALUE args...]
    local name=$1 plugin=$2
    shift 2
    local start=$SECONDS status=0
    local plugin_args=()
    [ $# -gt 0 ] && plugin_args=(--plugin-args "$@")
    "$TRAJECTOME" "$bids" "$check/out-$name" participant -w "$check/work-$name" \
        --plugin "$plugin" "${plugin_args[@]}" "${extra[@]}" \
        > "$check/log/$name.log" 2>&1 || status=$?
    log "$name: exit code $status in $((SECONDS - start)) s (log: $check/log/$name.log)"
    return "$status"
}

total=$SECONDS
slurm_status=0
# Nipype's SLURM jobs write their stdout next to each node; keep them small and local.
sbatch_args="sbatch_args=--cpus-per-task=1 --mem=2G"
if [ "$PLUGIN" = SLURMGraph ]; then
    run slurm SLURMGraph "dont_resubmit_completed_jobs=true" "$sbatch_args" || slurm_status=$?
    log "waiting for the submitted graph to drain"
    while [ -n "$(squeue -h -o %i)" ]; do sleep 2; done
    run slurm SLURMGraph "dont_resubmit_completed_jobs=true" "$sbatch_args" || slurm_status=$?
else
    run slurm SLURM "$sbatch_args" || slurm_status=$?
fi
log "Slurm allocated $(grep -c 'sched: Allocate' "$check/log/slurmctld.log" || true) jobs" \
    "(one is the smoke test)"
multiproc_status=0
reference=$check/out-multiproc
if [ -n "${REFERENCE_OUT:-}" ]; then
    reference=$REFERENCE_OUT
    multiproc_status=${REFERENCE_STATUS:-0}
    log "comparing with the existing MultiProc outputs in $reference"
else
    run multiproc MultiProc || multiproc_status=$?
fi
log "the runs took $((SECONDS - total)) s"

# ---------------------------------------------------------------- compare
# Every TSV/JSON/NIfTI/text (transforms) output except the per-run logs/ (timestamps,
# run ids).
compare() {
    local a=$1 b=$2 differ=0 count=0
    for dir in "$a" "$b"; do
        [ -d "$dir" ] || { echo "no outputs in $dir" >&2; return 1; }
    done
    diff <(cd "$a" && find . -path ./logs -prune -o -type f \
              \( -name '*.tsv' -o -name '*.json' -o -name '*.nii*' -o -name '*.txt' \) -print | sort) \
         <(cd "$b" && find . -path ./logs -prune -o -type f \
              \( -name '*.tsv' -o -name '*.json' -o -name '*.nii*' -o -name '*.txt' \) -print | sort) \
        || { echo "the two runs wrote different sets of files" >&2; differ=1; }
    while IFS= read -r file; do
        count=$((count + 1))
        [ -f "$b/$file" ] || continue
        cmp -s "$a/$file" "$b/$file" && continue
        # A gzip header holds a timestamp: equal decompressed bytes are equal data.
        if [[ $file == *.gz ]] && cmp -s <(gzip -dc "$a/$file") <(gzip -dc "$b/$file"); then
            echo "same data, different gzip header: $file"
            continue
        fi
        echo "differs: $file" >&2
        differ=1
    done < <(cd "$a" && find . -path ./logs -prune -o -type f \
                 \( -name '*.tsv' -o -name '*.json' -o -name '*.nii*' -o -name '*.txt' \) -print | sort)
    log "compared $count files"
    return "$differ"
}
same=0
compare "$check/out-slurm" "$reference" || same=1
if [ "$same" -eq 0 ]; then
    log "OK: SLURM and MultiProc outputs are byte-identical"
else
    log "FAIL: SLURM and MultiProc outputs differ"
fi
if [ "$slurm_status" -ne "$multiproc_status" ]; then
    log "FAIL: exit codes differ (SLURM $slurm_status, MultiProc $multiproc_status)"
    same=1
fi
exit "$same"
