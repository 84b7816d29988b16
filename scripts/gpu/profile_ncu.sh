#!/usr/bin/env bash
# Nsight Compute profiles of tdpo_loss forward + backward at the two shapes furthest from
# the bandwidth goal (bench/RESULTS.md): 8x2048x32000 float32 and 8x2048x128256 bfloat16.
#
#   bash scripts/gpu/profile_ncu.sh OUTDIR
#
# First `ncu --version`: without ncu it says so and exits 3, having run nothing else.
# Then, in OUTDIR:
#   build.log            only if tdpo_ext does not import with CUDA kernels (on a warm
#                        machine gpu_check.sh has built it: run that first)
# and for each shape TAG (f32_v32000, bf16_v128256):
#   timeline_TAG.txt     scripts/gpu/profile_case.py --kernel-table: the call's time and
#                        bandwidth, and torch.profiler's table of all its CUDA kernels
#   ncu_TAG.ncu-rep      ncu --set $TDPO_NCU_SET (default full) of tdpo_ext's kernels in
#                        one call (the NVTX range "profiled"; warm-up calls excluded)
#   ncu_TAG.log          ncu's output
#   ncu_TAG.txt          the report's details page, readable without the Nsight GUI
# and summary.md as gpu_check.sh writes it. Every step has its own timeout and the whole
# ends within $TDPO_PROFILE_SECONDS (default 480).
# Exit status: 0 all passed, 1 a step failed, 2 no GPU, 3 no ncu.
set -u
NAME=profile_ncu
TITLE="tdpo-ext Nsight Compute profiles"
DEADLINE=${TDPO_PROFILE_SECONDS:-480}
NCU_SET=${TDPO_NCU_SET:-full}
SHAPES="f32_v32000=8x2048x32000:float32 bf16_v128256=8x2048x128256:bfloat16"
# shellcheck source=scripts/gpu/lib.sh
. "$(dirname "$0")/lib.sh"
start_run "$@"

NCU=$(find_cuda_tool ncu | head -1)
if [ -z "$NCU" ]; then
  TOOLS="ncu: not found"
  note "ncu not found (looked on PATH, in CUDA_HOME, /usr/local/cuda*, /opt/nvidia, beside nvcc and in nvidia wheels)"
  skip_step all "no ncu"
  write_summary
  exit 3
fi
if ! NCU_VERSION=$("$NCU" --version 2>&1 | tail -1); then
  TOOLS="ncu: $NCU does not run"
  note "$NCU --version failed: $NCU_VERSION"
  skip_step all "no ncu"
  write_summary
  exit 3
fi
TOOLS="ncu: $NCU ($NCU_VERSION)"
find_gpu
echo "$NAME: $CARD | arch $ARCH | $SOFTWARE | $TOOLS"

if ! "$PY" -c "import sys, tdpo_ext; sys.exit(not tdpo_ext.built_with_cuda())" > /dev/null 2>&1; then
  build_in_place 240
  if [ $BUILT = no ]; then
    note "the profiles need the CUDA build; see build.log"
    write_summary
    exit 1
  fi
fi

for entry in $SHAPES; do
  tag=${entry%%=*} case=${entry#*=}
  run_step "timeline $case" 90 "timeline_$tag.txt" \
    "$PY" scripts/gpu/profile_case.py "$case" --kernel-table
  run_step "ncu $case" 180 "ncu_$tag.log" \
    "$NCU" --set "$NCU_SET" --import-source yes --nvtx --nvtx-include "profiled/" \
    --kernel-name regex:"token_stats|preference_loss" -f -o "$OUT/ncu_$tag" \
    "$PY" scripts/gpu/profile_case.py "$case"
  if grep -q ERR_NVGPUCTRPERM "$OUT/ncu_$tag.log" 2>/dev/null; then
    note "ncu $case: no permission to read the GPU's performance counters (ERR_NVGPUCTRPERM): the machine's driver must allow them (NVreg_RestrictProfilingToAdminUsers=0) or ncu must run as root"
  fi
  if [ -f "$OUT/ncu_$tag.ncu-rep" ]; then
    run_step "ncu report $case" 60 "ncu_$tag.txt" \
      "$NCU" --import "$OUT/ncu_$tag.ncu-rep" --page details
  fi
done

write_summary
exit $FAILED
