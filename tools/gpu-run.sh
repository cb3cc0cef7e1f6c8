#!/usr/bin/env bash
# One short GPU job, prepared to the last flag (docs/pipeline.md, "A run on a lent GPU"), handing back through $OUT.
#
#   MSKD_GIT_COMMIT=<commit> OUT=<folder> tools/gpu-run.sh pipeline MINUTES [reproduce.py flags...]
#       the whole pipeline in a MINUTES box with the specialists (mcl), its log and the machine's versions put
#       in the bundle; $OUT gets bundle.tar (the bundle without its weights) and each published file
#       (manifest.json and six networks: 8 files, within what a job hands back)
#   OUT=<folder> tools/gpu-run.sh checks
#       python -m pytest -m cuda, then bench.py at batch 512 and 1024; $OUT gets checks.log and bench.json
#
# Run from the repository's root (results/ and checkpoints/ are the current folder's). The data is
# data/cifar10-jpeg.tar.gz (carry it), or DATA; PRESET=smoke dry-runs the pipeline on a CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:?set OUT to the folder handed back}
export PYTHONUNBUFFERED=1
data=${DATA:-data/cifar10-jpeg.tar.gz}

without_progress() {  # tqdm redraws its bars with carriage returns: the log keeps every line but the bars
    tr '\r' '\n' | grep --line-buffered -Ev '^[^|]*[0-9]+%\|.*\| *[0-9]+/[0-9]+ \[' || true
}

versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python -c "import sys, torch, torchvision; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| torchvision', torchvision.__version__, '| CUDA', torch.version.cuda, '| cuDNN', torch.backends.cudnn.version())"
    echo "commit ${MSKD_GIT_COMMIT:-unknown}; $(nproc) CPU cores"
}

case "${1:-}" in
pipeline)
    minutes=${2:?MINUTES}
    shift 2
    : "${MSKD_GIT_COMMIT:?set MSKD_GIT_COMMIT: the machine may keep an older .git}"
    bundle=results/gpu-run
    command=(python "$root/reproduce.py" --preset "${PRESET:-full}" --minutes "$minutes" --with-specialists mcl
             --data-dir "$data" --out "$bundle" "$@")
    log=$(mktemp)
    started=$(date +%s)
    set +e
    "${command[@]}" 2>&1 | without_progress | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    mkdir -p "$bundle"
    { echo "\$ ${command[*]}"; cat "$log"; echo "exit code $status after $(( $(date +%s) - started )) s"; } \
        > "$bundle/reproduce.log"
    versions > "$bundle/machine.txt"
    tar -cf "$out/bundle.tar" --exclude=weights -C results gpu-run
    [ -d "$bundle/weights" ] && cp "$bundle"/weights/* "$out"/
    ls -l "$out"
    exit "$status"
    ;;
checks)
    { versions; (cd "$root" && python -m pytest -m cuda -q -p no:cacheprovider 2>&1) || true; } | without_progress | tee "$out/checks.log"
    python "$root/bench.py" --data-dir "$data" --archs densenet121 googlenet --batch-size 1024 --baseline \
        --out "$out/bench.json" 2>&1 | without_progress | tee -a "$out/checks.log"
    ;;
*)
    sed -n 2,11p "$0"
    exit 2
    ;;
esac
