#!/bin/bash
# shellcheck disable=SC2317  # functions that run from traps
# Trajectome on a SLURM cluster: one subject per array task, through the Apptainer image.
#
#   export TRAJECTOME_SIF=/shared/containers/trajectome.sif
#   export BIDS_DIR=/shared/data/ds-ect OUTPUT_DIR=/shared/derivatives/trajectome
#   export WORK_ROOT=/shared/scratch/$USER/trajectome-work     # persistent, shared scratch
#   n=$(($(wc -l < "$BIDS_DIR/participants.tsv") - 1))             # subjects (minus header)
#   mkdir -p logs && sbatch --array=1-"$n" scripts/slurm_array.sh
#   # once every task has finished:
#   apptainer run --cleanenv -B "$BIDS_DIR":/data:ro -B "$OUTPUT_DIR":/out \
#       "$TRAJECTOME_SIF" /data /out group
#
# Array task i processes the i-th subject of participants.tsv (its participant_id column).
# Validate the dataset once before submitting (or let the first run do it) and pass
# TRAJECTOME_ARGS="--skip-bids-validation" so every task does not re-validate all of it.
#
# Where the Nipype work directory lives (WORK_MODE):
#   shared (default)  WORK_ROOT/sub-<label> on shared scratch. A pre-empted or failed task
#                     that is requeued (or resubmitted by hand) resumes from every node that
#                     had finished. Costs: the small-file I/O of Nipype goes to the shared
#                     filesystem, and WORK_ROOT must be cleaned up by you once outputs are
#                     checked.
#   local             node-local scratch ($SLURM_TMPDIR, else /tmp), seeded from and copied
#                     back to WORK_ROOT/sub-<label> when the task ends, and on the SIGUSR1
#                     that --signal below asks for 10 min before the time limit. Faster I/O,
#                     but a pre-emption whose grace time is too short to copy the directory
#                     back (or a node crash) loses the progress of that run.
# Inside the container the work directory is always /work, so cached results stay valid
# whichever node or scratch path a resumed task gets.
#
#SBATCH --job-name=trajectome
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=logs/trajectome_%A_%a.out

set -euo pipefail

: "${TRAJECTOME_SIF:?set TRAJECTOME_SIF to the trajectome.sif image}"
: "${BIDS_DIR:?set BIDS_DIR to the BIDS dataset}"
: "${OUTPUT_DIR:?set OUTPUT_DIR to the derivatives directory}"
: "${WORK_ROOT:?set WORK_ROOT to a persistent scratch directory for Nipype work dirs}"
WORK_MODE=${WORK_MODE:-shared}
TRAJECTOME_ARGS=${TRAJECTOME_ARGS:-}
APPTAINER=${APPTAINER:-$(command -v apptainer || command -v singularity)}
task=${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=1-N}

participants=$BIDS_DIR/participants.tsv
[ -r "$participants" ] || { echo "cannot read $participants" >&2; exit 2; }
# The participant_id column, wherever it is; row `task` after the header.
subject=$(awk -F'\t' -v row="$task" '
    NR == 1 { for (i = 1; i <= NF; i++) if ($i == "participant_id") col = i; next }
    NR == row + 1 { print $col; exit }' "$participants" | tr -d '\r')
if [ -z "$subject" ]; then
    echo "$participants has no participant_id in row $task; submit --array=1-N with N" \
        "the number of subjects" >&2
    exit 2
fi
label=${subject#sub-}

persistent=$WORK_ROOT/sub-$label
mkdir -p "$persistent" "$OUTPUT_DIR"
# Absolute paths for the bind mounts.
BIDS_DIR=$(cd "$BIDS_DIR" && pwd)
OUTPUT_DIR=$(cd "$OUTPUT_DIR" && pwd)
persistent=$(cd "$persistent" && pwd)
save_work() { :; }
case $WORK_MODE in
    shared) work=$persistent ;;
    local)
        work=${SLURM_TMPDIR:-/tmp}/trajectome-${SLURM_JOB_ID}/sub-$label
        mkdir -p "$work"
        cp -a "$persistent/." "$work/"
        # Stale files left in $persistent are harmless: Nipype checks every node's hash.
        save_work() { cp -a "$work/." "$persistent/" && rm -rf "${work%/*}"; }
        trap save_work EXIT
        ;;
    *) echo "WORK_MODE must be shared or local, not $WORK_MODE" >&2; exit 2 ;;
esac

app=
# SIGUSR1 comes 10 min before the time limit (--signal above): stop the app, keep its work
# directory and requeue this task, which then resumes from the finished nodes.
on_usr1() {
    echo "$(date -Is) task $task: time limit near; saving work dir and requeueing" >&2
    if [ -n "$app" ]; then
        kill -TERM "$app" 2> /dev/null || true
        wait "$app" || true
    fi
    save_work
    trap - EXIT
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${task}"
    exit 0
}
trap on_usr1 USR1

# Memory for the scheduler: what SLURM granted, less 10 % headroom for Python itself.
mem_gb=$(awk -v mb="${SLURM_MEM_PER_NODE:-0}" 'BEGIN { if (mb > 0) printf "%d", mb * 0.9 / 1024 }')
nprocs=${SLURM_CPUS_PER_TASK:-1}

echo "$(date -Is) task $task: sub-$label on $(hostname), $nprocs CPUs, work dir $work" \
    "(restart ${SLURM_RESTART_COUNT:-0})"

# --cleanenv: nothing from the login environment (PYTHONPATH, conda, OMP settings) leaks in.
# --no-home: the entrypoint makes a throw-away HOME for caches instead of writing to yours.
# Run in the background and wait, so the USR1 trap fires while the app is still running.
# shellcheck disable=SC2086  # TRAJECTOME_ARGS is a list of options
"$APPTAINER" run --cleanenv --no-home \
    -B "$BIDS_DIR":/data:ro -B "$OUTPUT_DIR":/out -B "$work":/work \
    "$TRAJECTOME_SIF" /data /out participant \
    --participant-label "$label" -w /work --nprocs "$nprocs" \
    ${mem_gb:+--mem-gb "$mem_gb"} $TRAJECTOME_ARGS &
app=$!
status=0
wait "$app" || status=$?
echo "$(date -Is) task $task: sub-$label finished with exit code $status"
# 1 = some step failed (see the summary above and OUTPUT_DIR/logs); not worth a requeue.
exit "$status"
