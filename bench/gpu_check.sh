#!/usr/bin/env bash
# The prepared GPU check for a CUDA machine without network (the lent H100/H200): one call
# of at most 9 minutes (540 s) on a cold machine. Steps, each with its own time budget and
# a timestamp: install, versions, kernel correctness on CUDA, a training step eager vs
# torch.compile vs CUDA-graph replay without host syncs, the loss benchmarks (softmax
# and sigmoid), the masked matmul, the distillation step, the loader's device half, the
# peers beside our losses, then a one-screen summary of every measured ratio against its
# goal in shared TARGETS.md. Each benchmark writes its table to bench/results/ the moment it
# is done (and again after every measurement); after every step the new tables are copied
# to $OUT when set, so a timeout loses nothing already measured.
#
#   bash bench/gpu_check.sh --download  # with a registry: wheels of bench/gpu_wheels.txt -> .whl/
#   bash bench/gpu_check.sh             # on the GPU machine, repo root, .whl/ carried along
#   bash bench/gpu_check.sh --dry-run   # anywhere, no CUDA: the plan, every step walked
#   bash bench/gpu_check.sh --install   # its install step alone (CI's GPU-stack venv)
#
# PYTHON (default python3) runs everything; GPU_CHECK_BUDGET (default 540) is the total.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEEL_LIST=bench/gpu_wheels.txt
if [[ "${1:-}" == "--download" ]]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl -r "$WHEEL_LIST"
fi
DRY_RUN=0 ONLY=
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
elif [[ "${1:-}" == "--install" ]]; then
    ONLY=install
elif [[ $# -gt 0 ]]; then
    echo "usage: bash bench/gpu_check.sh [--download | --dry-run | --install]" >&2
    exit 2
fi

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-540}
SUMMARY_RESERVE=15 # seconds kept for the summary whatever the steps before it took
RESULTS=bench/results
LOGS=${OUT:-runs/gpu_check}
mkdir -p "$RESULTS" "$LOGS"
LOG="$LOGS/gpu_check$([[ -z "${OUT:-}" ]] && date +_%Y%m%d_%H%M%S).log"
MARK=$(mktemp)
trap 'rm -f "$MARK"' EXIT
export PYTHONUNBUFFERED=1
START=$SECONDS
STATUS=0
TESTS_AFFINITY="tests/kernels/test_init.py tests/ops/test_affinity_loss.py tests/test_losses.py \
tests/ops/test_host_reads.py tests/ops/test_backend.py"
TESTS_MASKED="tests/ops/test_masked_linear.py tests/pruning/test_masked_clip.py"
TESTS_SIGMOID="tests/ops/test_sigmoid_loss.py tests/test_sigmoid_losses.py"
PYTEST="$PY -m pytest -q -rfE -p no:cacheprovider -p autotune_first"

stamp() {
    local t=$((SECONDS - START))
    printf '[%s +%02d:%02d]' "$(date +%T)" $((t / 60)) $((t % 60))
}
say() { echo "$(stamp) $*" | tee -a "$LOG"; }

copy_tables() { # the tables written since the start, into $OUT
    [[ -n "${OUT:-}" && $DRY_RUN == 0 ]] || return 0
    find "$RESULTS" -maxdepth 1 -type f \( -name '*.md' -o -name '*.png' \) -newer "$MARK" \
        -exec cp {} "$OUT"/ \;
}

# step NAME BUDGET_S COMMAND DRY_COMMAND: COMMAND on the GPU, DRY_COMMAND under --dry-run.
step() {
    local name=$1 budget=$2 command=$3 dry=$4 limit rc
    local left=$((BUDGET - (SECONDS - START) - SUMMARY_RESERVE))
    [[ $name == summary ]] && left=$((left + SUMMARY_RESERVE))
    limit=$((budget < left ? budget : left))
    if [[ $DRY_RUN == 1 ]]; then
        say "step $name: budget ${budget} s: $command"
        command=$dry
        limit=600
    elif [[ -n $ONLY ]]; then
        say "step $name: start"
        limit=600
    elif ((limit < 10)); then
        say "step $name: SKIPPED, ${left} s of the ${BUDGET} s budget left"
        STATUS=1
        return
    else
        say "step $name: start (at most ${limit} s)"
    fi
    timeout --kill-after=10 "$limit" bash -c "$command" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    copy_tables
    if ((rc == 124 || rc == 137)); then
        say "step $name: TIMEOUT after ${limit} s (what it wrote is kept)"
        STATUS=1
    elif ((rc != 0)); then
        say "step $name: FAILED (exit $rc)"
        STATUS=1
    else
        say "step $name: done"
    fi
}

# The plan: name, budget in seconds, command on the GPU, command under --dry-run.
NAMES=() BUDGETS=() COMMANDS=() DRY_COMMANDS=()
plan() { NAMES+=("$1") BUDGETS+=("$2") COMMANDS+=("$3") DRY_COMMANDS+=("$4"); }
plan install 30 \
    "if compgen -G '.whl/*.whl' >/dev/null; then $PY -m pip install -q --no-index --no-deps \
--no-compile .whl/*.whl || exit 1; fi; $PY -m pip install -q --no-index --no-deps \
--no-build-isolation -e ." \
    "grep -v '^#' $WHEEL_LIST | while read -r wheel; do [[ -z \$wheel ]] && continue; \
name=\${wheel%%==*}; version=\${wheel##*==}; pattern=\"\$(echo \"\$name\" | tr - _)-\$version-\"; \
if compgen -G '.whl/*.whl' >/dev/null; then ls .whl | grep -qi \"^\$pattern\" \
|| { echo \"missing in .whl/: \$wheel\"; exit 1; }; fi; echo \"wheel: \$wheel\"; done"
plan versions 15 \
    "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; $PY -c \
\"import torch, triton, numpy, open_clip; print('torch', torch.__version__, 'CUDA', \
torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__, 'open_clip', \
open_clip.__version__, torch.cuda.get_device_name())\"" \
    "$PY -c \"import torch, triton, numpy, open_clip; print('torch', torch.__version__, \
'triton', triton.__version__, 'numpy', numpy.__version__, 'open_clip', open_clip.__version__)\""
# Correctness first: the kernels compile for CUDA (conftest leaves the interpreter off when
# a GPU exists), one autotune configuration each (bench/autotune_first.py).
plan kernel-tests-affinity 70 "PYTHONPATH=bench $PYTEST $TESTS_AFFINITY" \
    "PYTHONPATH=bench $PYTEST --collect-only $TESTS_AFFINITY | tail -1"
plan kernel-tests-masked 55 "PYTHONPATH=bench $PYTEST $TESTS_MASKED" \
    "PYTHONPATH=bench $PYTEST --collect-only $TESTS_MASKED | tail -1"
plan kernel-tests-sigmoid 35 "PYTHONPATH=bench $PYTEST $TESTS_SIGMOID" \
    "PYTHONPATH=bench $PYTEST --collect-only $TESTS_SIGMOID | tail -1"
# A training step (bf16 student under autocast, the loss, backward, AdamW) eager, compiled
# and replayed as a CUDA graph under sync debug mode "error": any host sync fails its mode.
plan step-graph 60 "$PY bench/bench_step_graph.py --quick --out $RESULTS" \
    "$PY bench/bench_step_graph.py --dry-run --out $RESULTS"
# The ensemble table (K = 1, 2, 4) after the main one, in the same budget: a timeout there
# loses only the ensemble rows not yet written.
plan loss-bench 75 "$PY bench/bench_affinity_loss.py --quick --out $RESULTS && \
$PY bench/bench_affinity_loss.py --ensemble --quick --out $RESULTS" \
    "$PY bench/bench_affinity_loss.py --quick --out $RESULTS --dry-run && \
$PY bench/bench_affinity_loss.py --ensemble --quick --out $RESULTS --dry-run"
plan sigmoid-bench 45 "$PY bench/bench_sigmoid_loss.py --quick --out $RESULTS" \
    "$PY bench/bench_sigmoid_loss.py --quick --out $RESULTS --dry-run"
plan masked-bench 45 "$PY bench/bench_masked_matmul.py --quick --out $RESULTS" \
    "$PY bench/bench_masked_matmul.py --quick --out $RESULTS --dry-run"
plan distill-bench 45 "$PY bench/bench_distill_step.py --quick --out $RESULTS" \
    "$PY bench/bench_distill_step.py --quick --out $RESULTS --dry-run"
# The loader's device half (resize, flip, jitter, normalise on the batch) and the nvjpeg
# decode, in images/s beside the CPU table of bench/results/loader_cpu.md.
plan loader-bench 20 "$PY bench/bench_loader.py --images 60 --device cuda --out $RESULTS/loader_gpu.md" \
    "$PY bench/bench_loader.py --images 2 --out $LOGS/loader_dry_run.md"
# The peers (Inf-CL, siglip-kernel, open_clip's losses) beside ours on the same inputs, each
# value checked against ours first; a peer that cannot run is a cell in the table. Last
# before the summary: it takes the time the steps above left, never theirs.
plan peers-bench 25 "$PY bench/bench_affinity_loss.py --peers --quick --out $RESULTS; \
first=\$?; $PY bench/bench_sigmoid_loss.py --peers --quick --out $RESULTS && exit \$first" \
    "$PY bench/bench_affinity_loss.py --peers --dry-run && \
$PY bench/bench_sigmoid_loss.py --peers --dry-run"
plan summary 15 \
    "$PY bench/gpu_summary.py --results $RESULTS $([[ -n "${OUT:-}" ]] && echo "--out $OUT/summary.txt")" \
    "$PY bench/gpu_summary.py --dry-run"

if [[ -n $ONLY ]]; then
    step "$ONLY" "${BUDGETS[0]}" "${COMMANDS[0]}" "${DRY_COMMANDS[0]}"
    exit $STATUS
fi
say "GPU check$([[ $DRY_RUN == 1 ]] && echo ' (DRY RUN: no CUDA needed)'), log $LOG; the plan:"
total=0
for i in "${!NAMES[@]}"; do
    say "  $((i + 1)). ${NAMES[i]}: ${BUDGETS[i]} s"
    total=$((total + BUDGETS[i]))
done
say "  budgets add up to ${total} s; the whole check stops at ${BUDGET} s"
for i in "${!NAMES[@]}"; do
    step "${NAMES[i]}" "${BUDGETS[i]}" "${COMMANDS[i]}" "${DRY_COMMANDS[i]}"
done
say "GPU check finished: $([[ $STATUS == 0 ]] && echo 'every step passed' || echo 'SOME STEPS FAILED')"
exit $STATUS
