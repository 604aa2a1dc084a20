#!/usr/bin/env bash
# GPU check for a CUDA machine without network (e.g. the lent H100/H200): installs the
# project and the wheels it lacks from .whl/, runs the kernel tests on CUDA, runs the
# benchmarks and writes their tables to bench/results/ (and to $OUT when set).
#
# Prepare on a machine with a registry, in the repository root:
#   bash bench/gpu_check.sh --download   # fills .whl/ with cp312 manylinux wheels
# Then on the GPU machine, in the repository root (carry .whl along):
#   bash bench/gpu_check.sh              # about 6-8 minutes on one H100/H200
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7)

if [[ "${1:-}" == "--download" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    exit $?
fi

PY=${PYTHON:-python3}
RESULTS=bench/results
LOG_DIR=${OUT:-$RESULTS}
mkdir -p "$RESULTS" "$LOG_DIR"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

status=0
# Kernel tests compile for CUDA here (conftest leaves TRITON_INTERPRET unset when a GPU exists).
timeout 240 $PY -m pytest -q tests/test_affinity_loss.py tests/test_losses.py \
    tests/test_masked_linear.py tests/test_masked_clip.py 2>&1 | tee "$LOG_DIR/gpu_tests.log" || status=1

for bench in bench_affinity_loss bench_masked_matmul bench_distill_step; do
    timeout 150 $PY "bench/$bench.py" --quick --out "$RESULTS" 2>&1 | tee "$LOG_DIR/$bench.log" || status=1
done

if [[ -n "${OUT:-}" ]]; then
    cp "$RESULTS"/*.md "$RESULTS"/*.png "$OUT"/ 2>/dev/null || true
fi
exit $status
