#!/usr/bin/env bash
# One-shot check on one H100/H200 (at most 10 minutes: each step has its own watchdog): install,
# the offline triton plan report, the triton and cuda parity tests, the persistent launches of both
# backends under a watchdog (a hang is reported, not waited on), the cuda kernels under
# compute-sanitizer (racecheck, synccheck), then the quick benchmarks. Everything is written under
# $OUT (default benchmarks/gpu_check).
#
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu_check}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1
status=0
step() {  # step NAME SECONDS COMMAND...: run under a watchdog, log to $OUT/NAME.txt
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout -k 10 "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "$name: HUNG or too slow, killed after ${seconds}s (see $OUT/$name.txt)"
        status=1
    elif [ "$rc" -ne 0 ]; then
        echo "$name: FAILED (exit $rc, see $OUT/$name.txt)"
        status=1
    else
        echo "$name: ok ($((SECONDS - start))s)"
    fi
    tail -n 3 "$OUT/$name.txt"
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
step install 120 pip install --no-deps --no-build-isolation -e .
step plans 45 python -m fastrnn.gpu_report --target sm_90 --configs small
step persistent 100 python benchmarks/persistent_smoke.py
step cuda-persistent 60 python benchmarks/persistent_smoke.py --backend cuda
step parity 120 python -m pytest -q -x tests/test_triton_backend.py tests/test_cuda_backend.py \
    tests/test_triton_plan.py tests/test_cuda_plan.py
if command -v compute-sanitizer > /dev/null; then
    for tool in racecheck synccheck; do
        step "sanitizer-$tool" 45 compute-sanitizer --tool "$tool" --error-exitcode 1 \
            python benchmarks/persistent_smoke.py --backend cuda --shapes tiny
    done
else
    echo "compute-sanitizer: not on PATH, skipped"
fi
step benchmarks 80 python -m pytest benchmarks/ --quick --backends triton,cuda \
    -k "fastrnns or latency" --results-dir "$OUT"
sed -n '/time ratios/,$p' "$OUT/benchmarks.txt" > "$OUT/table.txt"
echo "table: $OUT/table.txt"
exit $status
