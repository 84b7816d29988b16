#!/usr/bin/env bash
# One-shot check of tdpo-ext on a fresh GPU machine, in one call (no network needed):
#
#   bash scripts/gpu/gpu_check.sh OUTDIR
#
# step         what                                                     output in OUTDIR   H100 time
# build        the extension in place for this card only               build.log          80 s
#              (TORCH_CUDA_ARCH_LIST = its compute capability,
#              MAX_JOBS=16, TDPO_EXT_CUDA=1, setup.py build_ext --inplace;
#              an image without cmake needs carry [".whl"]: lib.sh)
# cuda_vs_cpu  scripts/gpu/sanitizer_case.py: the table of kernel cases  cuda_vs_cpu.log    10 s
#              (tests/kernel_cases.py: token_stats, token_stats_backward
#              with and without vocab_start, token_stats_tile,
#              token_stats_finish, preference_loss and its backward)
#              against the CPU op
# tests        the CUDA tests of the suite on the device (pytest -k       tests.log          25 s
#              "(cuda or CUDA) and not emulat": the emulated kernels
#              run in CI, on every machine)
# memcheck     the same case under compute-sanitizer memcheck           memcheck.log
# racecheck    ... and racecheck                                         racecheck.log
# metrics      scripts/gpu/metrics_overhead.py: the policy metrics on   metrics_cuda.md,   (not yet run)
#              against off (token_stats, the tiled ops, tdpo_loss        metrics.log
#              forward + backward; issue 32's target: <= 5% more)
# bench        bench/bench_ops.py --device cuda at every shape of its    bench_cuda.md,     60 s a shape
#              CUDA set, $TDPO_BENCH_ARGS (default "--reps 10")         bench.log
# fused        bench/bench_fused_linear.py --device cuda (N=8 T=2048     fused_cuda.md,     30 s+
#              H=4096 V=128256 bf16, with peak memory), $TDPO_FUSED_ARGS fused.log
# and OUTDIR/summary.md: the card, the tools found, each step's result and time.
# (Times: the H100 run, bench/HISTORY.md, where measured; about 7 minutes in all.)
# Every step has its own timeout, the bench gets what is left but $TDPO_FUSED_RESERVE
# seconds (default 90), and the whole ends within $TDPO_GPU_CHECK_SECONDS (default 540);
# a failing step does not stop the later ones. Profiles: profile_ncu.sh, after this.
# One TRL training step, TDPOTrainer beside DPOTrainer, is separate: trl_step.sh.
# Exit status: 0 all passed, 1 a step failed, 2 no GPU.
set -u
NAME=gpu_check
TITLE="tdpo-ext GPU check"
DEADLINE=${TDPO_GPU_CHECK_SECONDS:-540}
FUSED_RESERVE=${TDPO_FUSED_RESERVE:-90}
BENCH_ARGS=${TDPO_BENCH_ARGS:---reps 10}
# shellcheck source=scripts/gpu/lib.sh
. "$(dirname "$0")/lib.sh"
start_run "$@"

find_gpu
have_module() { "$PY" -c "import $1" > /dev/null 2>&1; }
HAVE_PYTEST=no; have_module pytest && HAVE_PYTEST=yes
HAVE_HYPOTHESIS=no; have_module hypothesis && HAVE_HYPOTHESIS=yes
SANITIZER=$(find_cuda_tool compute-sanitizer | head -1)
TOOLS="pytest: $HAVE_PYTEST, hypothesis: $HAVE_HYPOTHESIS, compute-sanitizer: ${SANITIZER:-not found}"
echo "$NAME: $CARD | arch $ARCH | $SOFTWARE | $TOOLS"

build_in_place 240
if [ $BUILT = no ]; then
  note "the later steps need the CUDA build; see build.log"
  for s in cuda_vs_cpu tests memcheck racecheck metrics bench fused; do skip_step "$s" "build failed"; done
  write_summary
  exit 1
fi

# Every kernel path against the CPU op, without a sanitizer.
run_step cuda_vs_cpu 60 cuda_vs_cpu.log "$PY" scripts/gpu/sanitizer_case.py
last=$(grep -E '^[0-9]+ failed' "$OUT/cuda_vs_cpu.log" | tail -1)
[ -n "$last" ] && note "cuda_vs_cpu: $last"

# The CUDA tests of the suite.
if [ $HAVE_PYTEST = yes ] && [ $HAVE_HYPOTHESIS = yes ]; then
  run_step tests 150 tests.log "$PY" -m pytest tests -q -k "(cuda or CUDA) and not emulat" -p no:cacheprovider
elif [ $HAVE_PYTEST = yes ]; then
  # tests/conftest.py imports hypothesis; the build test needs neither it nor the conftest.
  note "hypothesis is not installed: ran tests/test_cuda_build.py only (--noconftest)"
  run_step "tests (test_cuda_build.py only)" 150 tests.log \
    "$PY" -m pytest tests/test_cuda_build.py -q --noconftest -p no:cacheprovider
else
  note "pytest is not installed: the test suite did not run (cuda_vs_cpu covers the kernels)"
  skip_step tests "pytest not installed"
fi
tail_line=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/tests.log" 2>/dev/null | tail -1)
[ -n "$tail_line" ] && note "tests: $tail_line"

# compute-sanitizer: memory errors, then shared-memory races, on every kernel path.
if [ -n "$SANITIZER" ]; then
  # Without the caching allocator every tensor is its own cudaMalloc, so an access past
  # a tensor's end is outside any allocation and memcheck sees it.
  run_step memcheck 120 memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 86 "$PY" scripts/gpu/sanitizer_case.py
  run_step racecheck 120 racecheck.log \
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

# The policy metrics' cost: each step timed with them on and off.
run_step metrics 90 metrics.log "$PY" scripts/gpu/metrics_overhead.py --out "$OUT/metrics_cuda.md"

# The ops' benchmark at every shape of its CUDA set, with what is left but the fused
# benchmark's reserve. It rewrites bench_cuda.md after every shape, so a timeout keeps
# the shapes it finished.
left=$((DEADLINE - SECONDS - FUSED_RESERVE))
if [ "$left" -ge 30 ]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  run_step bench "$left" bench.log "$PY" bench/bench_ops.py --device cuda \
    --out "$OUT/bench_cuda.md" $BENCH_ARGS
else
  skip_step bench "only ${left}s left of the time budget"
fi

# Fused linear TDPO beside the materialized path and the reference pattern.
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
