#!/usr/bin/env bash
# One-shot check of tdpo-ext on a fresh GPU machine (no network needed):
#
#   bash scripts/gpu/gpu_check.sh OUTDIR
#
# 1. builds the extension in place for this card only (TORCH_CUDA_ARCH_LIST = its
#    compute capability, MAX_JOBS=16, TDPO_EXT_CUDA=1, `setup.py build_ext --inplace`:
#    one build, nothing fetched)                                         -> build.log
# 2. runs scripts/gpu/sanitizer_case.py plainly: every CUDA kernel vs the CPU op -> cuda_vs_cpu.log
# 3. runs the CUDA tests (pytest -k "cuda or CUDA")                        -> tests.log
# 4. runs scripts/gpu/sanitizer_case.py under compute-sanitizer memcheck        -> memcheck.log
# 5. ... and racecheck                                                     -> racecheck.log
# 6. runs bench/bench_ops.py --device cuda (extra arguments from $TDPO_BENCH_ARGS), within
#    what is left of the budget but $TDPO_FUSED_RESERVE seconds (default 120)
#                                                                          -> bench_cuda.md, bench.log
# 7. runs bench/bench_fused_linear.py --device cuda (N=8 T=2048 H=4096 V=128256 bf16;
#    extra arguments from $TDPO_FUSED_ARGS)                                -> fused_cuda.md, fused.log
# and writes OUTDIR/summary.md: the card, the tools found, each step's result and time.
# Every step has its own timeout and the whole ends within $TDPO_GPU_CHECK_SECONDS
# (default 530) seconds; a failing step does not stop the later ones.
# Exit status: 0 all passed, 1 a step failed, 2 no GPU.
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 64
fi
mkdir -p "$1" || exit 1
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.md"
DEADLINE=${TDPO_GPU_CHECK_SECONDS:-530}  # seconds after start by which the last step must end
FUSED_RESERVE=${TDPO_FUSED_RESERVE:-120} # seconds kept for step 7
ROWS=""        # the step table of the summary
NOTES=""       # lines under it
FAILED=0

note() { NOTES+="- $*"$'\n'; echo "gpu_check: $*"; }

# run_step NAME TIMEOUT LOG CMD...: runs CMD with its own timeout (cut to what is left
# before DEADLINE), output to LOG, and records PASS / FAIL (exit status) / TIMEOUT with
# the time it took.
run_step() {
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS rc result left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 10 ]; then
    skip_step "$name" "the time budget is spent"
    FAILED=1
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu_check: $name (timeout ${limit}s) -> $log"
  timeout -k 10 "$limit" "$@" > "$OUT/$log" 2>&1
  rc=$?
  case $rc in
    0) result=PASS ;;
    124|137) result="TIMEOUT after ${limit}s"; FAILED=1 ;;
    *) result="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  ROWS+="| $name | $result | $((SECONDS - start)) | $log |"$'\n'
  echo "gpu_check: $name: $result in $((SECONDS - start))s"
  return $rc
}

skip_step() {  # skip_step NAME WHY
  ROWS+="| $1 | SKIPPED: $2 | 0 | |"$'\n'
  echo "gpu_check: $1 skipped: $2"
}

write_summary() {
  {
    echo "# tdpo-ext GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host: $(hostname)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "- card: ${CARD:-none}"
    echo "- build: TORCH_CUDA_ARCH_LIST=${ARCH:-?}, MAX_JOBS=16, TDPO_EXT_CUDA=1"
    echo "- software: ${SOFTWARE:-?}"
    echo "- tools: ${TOOLS:-?}"
    echo "- total time: ${SECONDS}s"
    echo
    echo "| step | result | time (s) | log |"
    echo "|---|---|---|---|"
    printf '%s' "$ROWS"
    if [ -n "$NOTES" ]; then
      echo
      printf '%s' "$NOTES"
    fi
  } > "$SUMMARY"
  echo "gpu_check: summary in $SUMMARY"
}

# --- 0. Is there a GPU? Fail fast, with the reason, when not.
if ! command -v nvidia-smi > /dev/null 2>&1; then
  note "no GPU: nvidia-smi is not on PATH (no NVIDIA driver on this machine)"
  skip_step all "no GPU"
  write_summary
  exit 2
fi
CARD=$(timeout 20 nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version \
         --format=csv,noheader 2>&1 | head -1)
if ! timeout 20 nvidia-smi -L > /dev/null 2>&1 || [ -z "$CARD" ] || [[ $CARD == *NVIDIA-SMI* ]]; then
  note "no GPU: nvidia-smi failed: ${CARD:-no output}"
  CARD=""
  skip_step all "no GPU"
  write_summary
  exit 2
fi
IFS=, read -r gpu_name gpu_cap gpu_mem gpu_driver <<< "$CARD"
CARD="${gpu_name} (compute capability${gpu_cap},${gpu_mem}, driver${gpu_driver})"
if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  note "torch does not see the GPU (torch.cuda.is_available() is False or torch is missing)"
  skip_step all "torch sees no GPU"
  write_summary
  exit 2
fi

# compute_cap as "9.0"; older drivers lack that field, torch knows it too.
ARCH=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
if ! [[ $ARCH =~ ^[0-9]+\.[0-9]+$ ]]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
SOFTWARE=$("$PY" -c "import sys, torch; print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})')" 2>&1)
NVCC=$(command -v nvcc || true)
if [ -n "$NVCC" ]; then
  SOFTWARE+=", $(nvcc --version | grep -o 'release [0-9.]*' | head -1 | sed 's/release/nvcc/')"
else
  SOFTWARE+=", nvcc not on PATH"
fi

have_module() { "$PY" -c "import $1" > /dev/null 2>&1; }
HAVE_PYTEST=no; have_module pytest && HAVE_PYTEST=yes
HAVE_HYPOTHESIS=no; have_module hypothesis && HAVE_HYPOTHESIS=yes

# compute-sanitizer ships with the toolkit, whose bin/ may not be on PATH (nvcc can be a
# wrapper elsewhere): look in the usual places and beside the real nvcc.
find_sanitizer() {
  local c
  command -v compute-sanitizer 2>/dev/null && return
  for c in "${CUDA_HOME:-/nonexistent}/bin" "${CUDA_HOME:-/nonexistent}/compute-sanitizer" \
           /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer /usr/local/cuda-*/bin \
           /opt/nvidia/*/compute-sanitizer \
           "$( [ -n "$NVCC" ] && dirname "$(readlink -f "$NVCC")")"; do
    [ -x "$c/compute-sanitizer" ] && { echo "$c/compute-sanitizer"; return; }
  done
  # The toolkit behind a wrapper nvcc: its dry run prints TOP=<toolkit>.
  if [ -n "$NVCC" ]; then
    local probe top
    probe=$(mktemp --suffix=.cu)
    top=$(nvcc --dryrun -c "$probe" -o "$probe.o" 2>&1 | sed -n 's/.*TOP=\([^ ]*\).*/\1/p' | head -1 | tr -d '"')
    rm -f "$probe"
    [ -n "$top" ] && [ -x "$top/bin/compute-sanitizer" ] && { echo "$top/bin/compute-sanitizer"; return; }
  fi
  "$PY" - <<'EOF' 2>/dev/null
import glob, os, site
for base in site.getsitepackages():
    for c in glob.glob(os.path.join(base, "nvidia", "**", "compute-sanitizer"), recursive=True):
        if os.path.isfile(c) and os.access(c, os.X_OK):
            print(c)
            raise SystemExit
EOF
}
SANITIZER=$(find_sanitizer | head -1)
TOOLS="pytest: $HAVE_PYTEST, hypothesis: $HAVE_HYPOTHESIS, compute-sanitizer: ${SANITIZER:-not found}"
echo "gpu_check: $CARD | arch $ARCH | $SOFTWARE | $TOOLS"

# --- 1. Build for this card only, in place: one compile, nothing fetched from a network
# that is not there (a pip install could fall back and compile everything twice).
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 TDPO_EXT_CUDA=1 PY
BUILT=no
run_step build 240 build.log "$PY" setup.py build_ext --inplace && BUILT=yes
if [ $BUILT = yes ] && ! "$PY" -c "import sys, tdpo_ext; sys.exit(not tdpo_ext.built_with_cuda())" \
     >> "$OUT/build.log" 2>&1; then
  note "the build finished but tdpo_ext does not import with CUDA kernels (see build.log)"
  BUILT=no
  FAILED=1
fi

if [ $BUILT = no ]; then
  note "the later steps need the CUDA build; see build.log"
  for s in cuda_vs_cpu tests memcheck racecheck bench fused; do skip_step "$s" "build failed"; done
  write_summary
  exit 1
fi

# --- 2. Every CUDA kernel against the CPU op, without a sanitizer.
run_step cuda_vs_cpu 40 cuda_vs_cpu.log "$PY" scripts/gpu/sanitizer_case.py
last=$(grep -E '^[0-9]+ failed' "$OUT/cuda_vs_cpu.log" | tail -1)
[ -n "$last" ] && note "cuda_vs_cpu: $last"

# --- 3. The CUDA tests of the suite.
if [ $HAVE_PYTEST = yes ] && [ $HAVE_HYPOTHESIS = yes ]; then
  run_step tests 90 tests.log "$PY" -m pytest tests -q -k "cuda or CUDA" -p no:cacheprovider
elif [ $HAVE_PYTEST = yes ]; then
  # tests/conftest.py imports hypothesis; the build test needs neither it nor the conftest.
  note "hypothesis is not installed: ran tests/test_cuda_build.py only (--noconftest)"
  run_step "tests (test_cuda_build.py only)" 90 tests.log \
    "$PY" -m pytest tests/test_cuda_build.py -q --noconftest -p no:cacheprovider
else
  note "pytest is not installed: the test suite did not run (cuda_vs_cpu covers the kernels)"
  skip_step tests "pytest not installed"
fi
tail_line=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/tests.log" 2>/dev/null | tail -1)
[ -n "$tail_line" ] && note "tests: $tail_line"

# --- 4, 5. compute-sanitizer: memory errors, then shared-memory races.
if [ -n "$SANITIZER" ]; then
  # Without the caching allocator every tensor is its own cudaMalloc, so an access past
  # a tensor's end is outside any allocation and memcheck sees it.
  run_step memcheck 80 memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 86 "$PY" scripts/gpu/sanitizer_case.py
  run_step racecheck 80 racecheck.log \
    "$SANITIZER" --tool racecheck --error-exitcode 86 "$PY" scripts/gpu/sanitizer_case.py
  for tool in memcheck racecheck; do
    s=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1)
    [ -n "$s" ] && note "$tool: ${s#========= }"
  done
  note "memcheck/racecheck exit 86: the tool found errors; exit 1: a result differed from the CPU op; exit 2: no GPU or no CUDA kernels"
else
  note "compute-sanitizer not found (looked on PATH, in CUDA_HOME, /usr/local/cuda*, beside nvcc and in nvidia wheels)"
  skip_step memcheck "compute-sanitizer not found"
  skip_step racecheck "compute-sanitizer not found"
fi

# --- 6. Benchmark of the ops, with what is left but step 7's reserve.
if [ -f bench/bench_ops.py ]; then
  left=$((DEADLINE - SECONDS - FUSED_RESERVE))
  if [ "$left" -ge 30 ]; then
    # shellcheck disable=SC2086  # TDPO_BENCH_ARGS is a list of arguments
    run_step bench "$left" bench.log "$PY" bench/bench_ops.py --device cuda \
      --out "$OUT/bench_cuda.md" ${TDPO_BENCH_ARGS:-}
  else
    skip_step bench "only ${left}s left of the time budget"
  fi
else
  note "bench/bench_ops.py is absent in this checkout: no benchmark was run"
  skip_step bench "bench/bench_ops.py absent"
fi

# --- 7. Fused linear TDPO beside the materialized path and the reference pattern.
left=$((DEADLINE - SECONDS))
if [ "$left" -ge 30 ]; then
  # shellcheck disable=SC2086  # TDPO_FUSED_ARGS is a list of arguments
  run_step fused "$left" fused.log "$PY" bench/bench_fused_linear.py --device cuda \
    --out "$OUT/fused_cuda.md" ${TDPO_FUSED_ARGS:-}
else
  skip_step fused "only ${left}s left of the time budget"
fi

write_summary
exit $FAILED
