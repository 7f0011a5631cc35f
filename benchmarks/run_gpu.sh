#!/usr/bin/env bash
# GPU tests and benchmark in one go, on a CUDA machine without network access.
#
#   benchmarks/run_gpu.sh [tests|lessons|grade|bench|all] [extra bench_attention.py arguments]
#
# tests: the kernels' GPU and CPU-suite tests (TEST_FILES picks others, e.g. "tests/test_decode.py"); lessons:
# every solution notebook's GPU path (tests/test_lessons_gpu.py, each notebook's output kept in $OUT/lessons/);
# grade: the course's grader on the GPU lessons' solutions, hidden tests included, in its sandbox (GRADE_PATHS picks
# others); bench: the benchmark (BENCH picks another script, e.g. benchmarks/bench_decode.py); all: but grade.
#
# sb_ref is put on the path the way the install maps it (sb_ref/ plus kernels/ as sb_ref/kernels) in a scratch
# folder, so neither pip nor the network is needed; pytest comes from .whl/ when the machine lacks it.
# Logs, the per-case error JSON and the benchmark Markdown go to $OUT (default benchmarks/results/gpu_run).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/benchmarks/results/gpu_run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MODE=${1:-all}
shift || true
SITE=$(mktemp -d /tmp/sb_site.XXXX)
cp -r "$REPO/sb_ref" "$SITE/sb_ref"
rm -rf "$SITE/sb_ref/kernels"
cp -r "$REPO/kernels" "$SITE/sb_ref/kernels"
if ! $PY -c "import pytest" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE/wheels" "$REPO"/.whl/*.whl
fi
export PYTHONPATH="$SITE:$SITE/wheels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd /tmp  # not the repo root: its sb_ref/ (without kernels/) would shadow the assembled package
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
rc=0
if [[ $MODE == tests || $MODE == all ]]; then
    read -r -a files <<< "${TEST_FILES:-tests/test_kernels_gpu.py tests/test_kernels.py}"
    PYTHONPATH="$SITE:$REPO:$PYTHONPATH" SB_GPU_RESULTS="$OUT/gpu_errors.json" timeout ${TEST_TIMEOUT:-560} $PY -m pytest "${files[@]/#/$REPO/}" \
        -v -rfE -p no:cacheprovider --durations=25 ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/tests.log"
    rc=$((rc | ${PIPESTATUS[0]}))
fi
if [[ $MODE == lessons || $MODE == all ]]; then
    SB_LESSON_LOGS="$OUT/lessons" timeout ${TEST_TIMEOUT:-560} $PY -m pytest "$REPO/tests/test_lessons_gpu.py" -v -rfE \
        -p no:cacheprovider --durations=10 ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/lessons.log"
    rc=$((rc | ${PIPESTATUS[0]}))
fi
if [[ $MODE == grade ]]; then
    { command -v bwrap setpriv; bwrap --version; } 2>&1 | tee "$OUT/grade.log"
    read -r -a paths <<< "${GRADE_PATHS:-solutions/06_triton_forward solutions/07_triton_backward solutions/08_performance}"
    PYTHONPATH="$SITE:$REPO:$PYTHONPATH" timeout ${TEST_TIMEOUT:-560} $PY -m autograder --with-hidden \
        "${paths[@]/#/$REPO/}" --json "$OUT/grades.json" 2>&1 | tee -a "$OUT/grade.log"
    rc=$((rc | ${PIPESTATUS[0]}))
fi
if [[ $MODE == bench || $MODE == all ]]; then
    timeout ${BENCH_TIMEOUT:-560} $PY "$REPO/${BENCH:-benchmarks/bench_attention.py}" --out "$OUT/bench.md" "$@" 2>&1 \
        | tee "$OUT/bench.log"
    rc=$((rc | ${PIPESTATUS[0]}))
fi
exit $rc
