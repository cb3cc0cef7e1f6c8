#!/usr/bin/env bash
# One short GPU job, prepared to the last flag (docs/pipeline.md, "A run on a lent GPU"), handing back through $OUT.
#
#   MSKD_GIT_COMMIT=<commit> OUT=<folder> tools/gpu-run.sh pipeline MINUTES [reproduce.py flags...]
#       ends within MINUTES: the smoke preset on the GPU first (every stage's CUDA path in about a minute; where
#       it fails, $OUT gets preflight.log and nothing longer runs), then the whole pipeline with the specialists
#       (SPECIALISTS, default mcl; empty for none) in a box of the minutes left, or with the epochs of the bundle
#       that a flag --epochs-from BUNDLE names, stopped 15 s past MINUTES if it overruns; the logs and the
#       machine's versions go in the bundle, and $OUT gets bundle.tar (the bundle without its weights) and each
#       published file (manifest.json and six networks: 8 files). Give the job MINUTES and 30 s.
#   OUT=<folder> tools/gpu-run.sh checks
#       python -m pytest -m "cuda and not slow", then bench.py at batch 512 and 1024; $OUT gets checks.log and
#       bench.json
#   tools/gpu-run.sh publish FILES DEST
#       on your machine, from the files a pipeline job handed back (FILES): the bundle with its weights in DEST
#       (results/published/<gpu>-<yyyy-mm-dd>), keeping one pair's weights (publish.py --pair best) where both
#       would take the tracked tree over 40 MiB
#
# Run from the repository's root (results/ and checkpoints/ are the current folder's). The data is
# data/cifar10-jpeg.tar.gz (carry it), or DATA; PRESET=smoke dry-runs the pipeline on a CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
data=${DATA:-data/cifar10-jpeg.tar.gz}
started=$(date +%s)
outside_box=25  # seconds of the job outside reproduce.py's own clock: Python's start, the hand-back (2026-11-28: 21)
overrun=15  # seconds past MINUTES after which the pipeline is stopped
preflight_limit=240  # seconds: a preflight slower than this is not what it was planned as (about one minute)
tree_limit=$((40 * 2**20))

without_progress() {  # tqdm redraws its bars with carriage returns: the log keeps every line but the bars
    tr '\r' '\n' | grep --line-buffered -Ev '^[^|]*[0-9]+%\|.*\| *[0-9]+/[0-9]+ \[' || true
}

versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python -c "import sys, torch, torchvision; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| torchvision', torchvision.__version__, '| CUDA', torch.version.cuda, '| cuDNN', torch.backends.cudnn.version())"
    echo "commit ${MSKD_GIT_COMMIT:-unknown}; $(nproc) CPU cores"
}

logged() {  # logged LOG COMMAND...: run it, its output shown and kept in LOG without progress bars; its exit code
    local log=$1
    shift
    set +e
    "$@" 2>&1 | without_progress | tee "$log"
    local status=${PIPESTATUS[0]}
    set -e
    return "$status"
}

case "${1:-}" in
pipeline)
    minutes=${2:?MINUTES}
    shift 2
    if ! awk -v m="$minutes" 'BEGIN { exit !(m ~ /^[0-9]*\.?[0-9]+$/ && m > 0) }'; then
        echo "error: MINUTES is the job's length in minutes, such as 9.4; got '$minutes'" >&2
        exit 2
    fi
    out=${OUT:?set OUT to the folder handed back}
    mkdir -p "$out"  # a lent machine's exists; a dry run's need not
    : "${MSKD_GIT_COMMIT:?set MSKD_GIT_COMMIT: the machine may keep an older .git}"
    specialists=${SPECIALISTS-mcl}
    flags=() length=()  # the flags of both runs; the pipeline's length: a time box, or a bundle's epochs
    while (( $# )); do
        case $1 in
        --epochs-from) length=(--epochs-from "${2:?--epochs-from BUNDLE}"); shift 2 ;;
        --epochs-from=*) length=(--epochs-from "${1#*=}"); shift ;;
        *) flags+=("$1"); shift ;;
        esac
    done
    if [ -n "$specialists" ]; then flags=(--with-specialists "$specialists" "${flags[@]}"); fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    preflight=(python "$root/reproduce.py" --preset smoke --device cuda --name preflight --force
               --data-dir "$data" --out "$work/preflight" "${flags[@]}")  # --force: a warm machine's retrained too
    status=0
    logged "$work/preflight.log" timeout -k 10 "$preflight_limit" "${preflight[@]}" || status=$?
    if [ "$status" != 0 ]; then
        { echo "\$ ${preflight[*]}"; cat "$work/preflight.log"; echo "exit code $status"; } > "$out/preflight.log"
        echo "the preflight failed (exit code $status): nothing longer was run; its log is $out/preflight.log"
        exit "$status"
    fi
    elapsed=$(( $(date +%s) - started ))
    box=$(awk -v m="$minutes" -v s=$(( elapsed + outside_box )) 'BEGIN { printf "%.2f", m - s / 60 }')
    limit=$(awk -v m="$minutes" -v s=$(( overrun - elapsed )) 'BEGIN { printf "%d", m * 60 + s }')
    if awk -v b="$box" 'BEGIN { exit !(b < 1) }'; then
        echo "error: the preflight left $box of the $minutes minutes to the pipeline, under 1: give more" >&2
        exit 2
    fi
    if (( ${#length[@]} )); then
        echo "preflight passed; the pipeline runs the epochs of ${length[1]}, stopped if not done in $limit s"
    else
        length=(--minutes "$box")
        echo "preflight passed; the pipeline gets the $box minutes left of $minutes"
    fi
    bundle=results/gpu-run
    if [ -e "$bundle" ]; then mv "$bundle" "$bundle-before-$started"; fi  # a warm machine's earlier call's
    command=(python "$root/reproduce.py" --preset "${PRESET:-full}" "${length[@]}" --data-dir "$data" --out "$bundle"
             --name gpu-run "${flags[@]}")  # its own experiment: never one an earlier run of another command left
    status=0  # stopped (and its checkpoints saved) where it overruns the job's end, so that its log still comes back
    logged "$work/reproduce.log" timeout -k 10 "$limit" "${command[@]}" || status=$?
    if [ ! -e "$bundle" ] && [ -d "$bundle.unfinished" ]; then mv "$bundle.unfinished" "$bundle"; fi  # stopped
    mkdir -p "$bundle"
    { echo "\$ ${command[*]}"; cat "$work/reproduce.log"
      echo "exit code $status after $(( $(date +%s) - started )) s of the job"; } > "$bundle/reproduce.log"
    { echo "\$ ${preflight[*]}"; cat "$work/preflight.log"; } > "$bundle/preflight.log"
    versions > "$bundle/machine.txt"
    # without the weights (handed back file by file) nor the hidden temporary files and folders that a write killed
    # outright leaves (utils/runs.py): either could take bundle.tar past the 16 MiB a file can have to come back
    tar -cf "$out/bundle.tar" --exclude=weights --exclude='.*.tmp' --exclude='.*.old' -C results gpu-run
    [ -d "$bundle/weights" ] && cp "$bundle"/weights/* "$out"/
    ls -l "$out"
    exit "$status"
    ;;
checks)
    out=${OUT:?set OUT to the folder handed back}
    mkdir -p "$out"
    { versions; (cd "$root" && python -m pytest -m "cuda and not slow" -q -p no:cacheprovider 2>&1) || true; } \
        | without_progress | tee "$out/checks.log"
    python "$root/bench.py" --data-dir "$data" --archs densenet121 googlenet --batch-size 1024 --baseline \
        --out "$out/bench.json" 2>&1 | without_progress | tee -a "$out/checks.log"
    ;;
publish)
    files=${2:?FILES: the folder the pipeline job handed back}
    dest=${3:?DEST: results/published/<gpu>-<yyyy-mm-dd>}
    if [ ! -f "$files/bundle.tar" ]; then
        echo "error: $files holds no bundle.tar: give the folder that a pipeline job handed back" >&2
        exit 2
    fi
    if [ -e "$dest" ]; then echo "error: $dest exists; choose another DEST, or remove it first" >&2; exit 2; fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    tar -xf "$files/bundle.tar" -C "$work"
    mkdir "$work/gpu-run/weights"
    cp "$files/manifest.json" "$files"/*.pt.gz "$work/gpu-run/weights/"
    mkdir -p "$(dirname "$dest")"
    mv "$work/gpu-run" "$dest"
    tracked=$(cd "$root" && { git ls-files -z | du -cb --files0-from=- 2>/dev/null || true; } | tail -1 | cut -f1)
    adding=$(du -sb "$dest" | cut -f1)
    echo "tracked tree $((tracked / 2**20)) MiB; the bundle with both pairs' weights $((adding / 2**20)) MiB"
    if (( tracked + adding > tree_limit )); then
        python "$root/publish.py" --from "$dest/weights" --pair best --force
    fi
    du -sh "$dest"
    du -h "$dest"/weights/*
    ;;
*)
    sed -n 2,20p "$0"
    exit 2
    ;;
esac
