#!/usr/bin/env bash
# The one-shot check on a lent H100/H200, sized for the device tool: one command under its 600 s
# limit (a deadline of GPU_CHECK_DEADLINE seconds, default 480, over all steps), at most 8 files
# back, python3, and no step that stops the ones after it.
#
#     bash benchmarks/gpu_check.sh            # on the GPU machine (OUT=... to choose the folder)
#     bash benchmarks/gpu_check.sh --dry-run  # here, no GPU: the offline part of every step
#     GPU_CHECK_STEPS="triton-tests cuda-tests" bash benchmarks/gpu_check.sh  # a rerun of some
#
# Steps, most important first (the main path before the fallback), each with its expected time
# (budget) and its cap; a step gets min(cap, time left before the deadline), and a step that no
# longer fits is reported as not run. The basis of each budget is printed beside it.
# Written to $OUT (default benchmarks/gpu_check): gpu_check.log (every step's output),
# gpu_check.json (every figure: steps, times, smoke lines, test counts, benchmark ratios) and
# ratios.png. Nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-benchmarks/gpu_check}
PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE:-480}
[ "$DRY_RUN" -eq 1 ] && DEADLINE=${GPU_CHECK_DEADLINE:-1500}  # compiling here, on 2 cores, cold
ONLY=${GPU_CHECK_STEPS:-}  # a rerun: only these steps (names, space-separated)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d)  # step records and benchmark results; only the three files above go to $OUT
: > "$LOG"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
START=$SECONDS

cuda_home() {  # the first toolkit folder holding both nvcc and cuda_runtime.h
    local candidates=("${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*)
    local nvcc
    nvcc=$(command -v nvcc) && candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
    nvcc=$(command -v nvcc) &&  # a wrapper script: exec /usr/local/cuda-13.0/bin/nvcc "$@"
        candidates+=("$(sed -n 's|^exec \(.*\)/bin/nvcc.*|\1|p' "$nvcc" 2>/dev/null)")
    for home in "${candidates[@]}"; do
        if [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && [ -f "$home/include/cuda_runtime.h" ]; then
            echo "$home"
            return 0
        fi
    done
    return 1
}

step() {  # step NAME BUDGET CAP "BASIS" COMMAND...: run under a watchdog, log, record
    local name=$1 budget=$2 cap=$3 basis=$4
    shift 4
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local left=$((DEADLINE - (SECONDS - START) - 5))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt $((budget < 10 ? budget : 10)) ]; then
        echo "$name: NOT RUN (${left}s left before the ${DEADLINE}s deadline, budget ${budget}s)"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "not run" "" 0 "$budget" "$cap" "$basis" \
            >> "$WORK/steps.tsv"
        return
    fi
    printf '\n===== %s (budget %ss, cap %ss: %s)\n$ %s\n' "$name" "$budget" "$limit" "$basis" \
        "$*" >> "$LOG"
    local begin=$SECONDS
    timeout -k 5 "$limit" "$@" > "$WORK/$name.txt" 2>&1
    local rc=$? took=$((SECONDS - begin)) status=ok
    cat "$WORK/$name.txt" >> "$LOG"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="timed out"
    elif [ "$rc" -ne 0 ]; then status="failed"; fi
    printf '%-16s %-9s %4ss (budget %4ss, cap %4ss)  %s\n' "$name" "$status" "$took" "$budget" \
        "$limit" "$(tail -n 1 "$WORK/$name.txt" | cut -c1-100)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" "$budget" "$limit" \
        "$basis" >> "$WORK/steps.tsv"
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; echo "CUDA_HOME: $(cuda_home || echo none found)"
  nproc; } > "$WORK/device.txt" 2>&1
cat "$WORK/device.txt" | tee -a "$LOG"
if home=$(cuda_home); then export CUDA_HOME=$home; fi
export MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=9.0  # the cuda extension: all cores, sm_90 only

# Budgets: measured on the project's 2-core CPU machine (2026-12-04, other work running beside it,
# so upper bounds for the GPU machine's 16 cores), see benchmarks/RESULTS.md "Device check".
if [ "$DRY_RUN" -eq 0 ]; then
    step install 60 150 "the _C_cpu build: 5 files in parallel; 145 s here, one by one" \
        env FASTRNN_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
    step plans 10 30 "smoke plans from the shipped resource table, no compile" \
        "$PY" -m fastrnn.gpu_report --target sm_90 --configs smoke
    step triton-smoke 80 150 "planning 1.4 s (table), 10 kernel compiles 3-12 s each here" \
        "$PY" benchmarks/persistent_smoke.py
    step admission 30 90 "the smoke shapes through auto: kernels cached by triton-smoke, one check each" \
        env FASTRNN_CACHE_DIR="$WORK/admission" "$PY" benchmarks/persistent_smoke.py --admission
    step triton-tests 90 150 "58 small kernel compiles at launch (0.4-1.7 s each here)" \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_triton_plan.py
    step cuda-build 60 150 "3 files in parallel: binding.cpp ~60 s, the two .cu 45 s here" \
        "$PY" -c "from fastrnn.backends import cuda; print(cuda._load_extension().__file__)"
    step cuda-smoke 20 60 "5 layers, no compile" "$PY" benchmarks/persistent_smoke.py --backend cuda
    step cuda-tests 30 60 "GPU cuda parity tests" \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py tests/test_cuda_launcher.py
    step step-tests 10 30 "4 CUDA step tests: graph capture, kernel count; torch's own kernels" \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_step_calls.py -k cuda
    step benchmarks 50 90 "2 configs x 3 dtypes, --quick: 12 groups of 3 s budget" \
        "$PY" -m pytest benchmarks/ -q -p no:cacheprovider --quick --backends triton,cuda \
        -k "fastrnns or latency" --results-dir "$WORK/results"
    if command -v compute-sanitizer > /dev/null; then
        step sanitizer 20 45 "racecheck of 4 tiny cuda layers (fails at once on gVisor)" \
            compute-sanitizer --tool racecheck --error-exitcode 1 \
            "$PY" benchmarks/persistent_smoke.py --backend cuda --shapes tiny
    fi
else
    # The same steps without a GPU: what each compiles, compiled here for sm_90, timed.
    step install 60 300 "_C_cpu build" \
        env FASTRNN_SKIP_CUDA_BUILD=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    step plans 10 30 "smoke plans from the shipped resource table" \
        env -u TRITON_INTERPRET FASTRNN_CACHE_DIR="$WORK/cache" \
        "$PY" -m fastrnn.gpu_report --target sm_90 --configs smoke
    step triton-smoke 90 400 "planning the smoke shapes cold, without and with the table" \
        "$PY" benchmarks/first_call.py
    step triton-tests 100 300 "every kernel the GPU tests launch, compiled for sm_90" \
        env -u TRITON_INTERPRET TRITON_CACHE_DIR="$WORK/triton-cold" \
        "$PY" tests/test_triton_gpu_compile.py
    if command -v nvcc > /dev/null; then
        step cuda-build 90 150 "the device code of _C_cuda (binding.cpp needs a CUDA torch)" \
            bash -c 'for f in forward backward; do nvcc -c -arch=sm_90 -O3 -Icsrc/cuda \
                     csrc/cuda/$f.cu -o "$0/$f.o" || exit 1; done' "$WORK"
    fi
fi

[ -f "$WORK/results/ratios.png" ] && cp "$WORK/results/ratios.png" "$OUT/"
"$PY" benchmarks/gpu_check_summary.py "$WORK" "$OUT/gpu_check.json" "$DRY_RUN"
status=$?  # 1 unless every step ran and passed
echo "total $((SECONDS - START))s of the ${DEADLINE}s deadline; files in $OUT:"
ls -1 "$OUT"
rm -rf "$WORK"
exit $status
