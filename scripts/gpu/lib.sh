# Shared by gpu_check.sh and profile_ncu.sh (sourced, not run): the output folder, steps
# with their own timeouts inside one time budget, a summary.md of them, the card, the
# CUDA tools, and the in-place build.
#
# The sourcing script sets NAME (its name in messages), TITLE (the summary's heading) and
# DEADLINE (seconds after its start by which the last step must end), then calls
# start_run "$@".

ROWS=""    # the step table of the summary
NOTES=""   # lines under it
FAILED=0
PY=${PYTHON:-python3}

# start_run OUTDIR: makes OUTDIR, sets OUT to its absolute path, and goes to the
# repository root, where every step runs.
start_run() {
  if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 64
  fi
  mkdir -p "$1" || exit 1
  OUT=$(cd "$1" && pwd)
  cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
}

note() { NOTES+="- $*"$'\n'; echo "$NAME: $*"; }

# run_step STEP TIMEOUT LOG CMD...: runs CMD with its own timeout (cut to what is left
# before DEADLINE), output to $OUT/LOG, and records PASS / FAIL (exit status) / TIMEOUT
# with the time it took. Returns CMD's status.
run_step() {
  local step=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS rc result left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 10 ]; then
    skip_step "$step" "the time budget is spent"
    FAILED=1
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "$NAME: $step (timeout ${limit}s) -> $log"
  timeout -k 10 "$limit" "$@" > "$OUT/$log" 2>&1
  rc=$?
  case $rc in
    0) result=PASS ;;
    124|137) result="TIMEOUT after ${limit}s"; FAILED=1 ;;
    *) result="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  ROWS+="| $step | $result | $((SECONDS - start)) | $log |"$'\n'
  echo "$NAME: $step: $result in $((SECONDS - start))s"
  return $rc
}

skip_step() {  # skip_step STEP WHY
  ROWS+="| $1 | SKIPPED: $2 | 0 | |"$'\n'
  echo "$NAME: $1 skipped: $2"
}

write_summary() {
  {
    echo "# $TITLE"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host: $(hostname)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "- card: ${CARD:-none}"
    echo "- build: ${BUILD_SETTINGS:-none by this script}"
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
  } > "$OUT/summary.md"
  echo "$NAME: summary in $OUT/summary.md"
}

# no_gpu WHY: records that there is nothing to run on, writes the summary, exits 2.
no_gpu() {
  note "no GPU: $1"
  skip_step all "no GPU"
  write_summary
  exit 2
}

# find_gpu: sets CARD (name, compute capability, memory, driver), ARCH ("9.0") and
# SOFTWARE, or exits through no_gpu with the reason.
find_gpu() {
  command -v nvidia-smi > /dev/null 2>&1 ||
    no_gpu "nvidia-smi is not on PATH (no NVIDIA driver on this machine)"
  CARD=$(timeout 20 nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version \
           --format=csv,noheader 2>&1 | head -1)
  if ! timeout 20 nvidia-smi -L > /dev/null 2>&1 || [ -z "$CARD" ] || [[ $CARD == *NVIDIA-SMI* ]]; then
    local why="nvidia-smi failed: ${CARD:-no output}"
    CARD=""
    no_gpu "$why"
  fi
  local gpu_name gpu_cap gpu_mem gpu_driver
  IFS=, read -r gpu_name gpu_cap gpu_mem gpu_driver <<< "$CARD"
  CARD="${gpu_name} (compute capability${gpu_cap},${gpu_mem}, driver${gpu_driver})"
  timeout 60 "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null ||
    no_gpu "torch does not see the GPU (torch.cuda.is_available() is False or torch is missing)"
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
}

# find_cuda_tool NAME (compute-sanitizer, ncu): prints its path, or nothing. Such tools
# ship with the toolkit, whose bin/ may not be on PATH (nvcc can be a wrapper
# elsewhere): looks on PATH, in the usual places, beside the real nvcc, in the toolkit
# that a wrapper nvcc's dry run names (TOP=...), and in nvidia pip wheels.
find_cuda_tool() {
  local tool=$1 c
  command -v "$tool" 2>/dev/null && return
  for c in "${CUDA_HOME:-/nonexistent}/bin" "${CUDA_HOME:-/nonexistent}/$tool" \
           /usr/local/cuda/bin /usr/local/cuda/"$tool" /usr/local/cuda-*/bin \
           /opt/nvidia/*/"$tool" /opt/nvidia/nsight-compute/* \
           "$( [ -n "${NVCC:-}" ] && dirname "$(readlink -f "$NVCC")")"; do
    [ -x "$c/$tool" ] && { echo "$c/$tool"; return; }
  done
  if [ -n "${NVCC:-}" ]; then
    local probe top
    probe=$(mktemp --suffix=.cu)
    top=$(nvcc --dryrun -c "$probe" -o "$probe.o" 2>&1 | sed -n 's/.*TOP=\([^ ]*\).*/\1/p' | head -1 | tr -d '"')
    rm -f "$probe"
    [ -n "$top" ] && [ -x "$top/bin/$tool" ] && { echo "$top/bin/$tool"; return; }
  fi
  TOOL="$tool" "$PY" - <<'EOF' 2>/dev/null
import glob, os, site
for base in site.getsitepackages():
    for c in glob.glob(os.path.join(base, "nvidia", "**", os.environ["TOOL"]), recursive=True):
        if os.path.isfile(c) and os.access(c, os.X_OK):
            print(c)
            raise SystemExit
EOF
}

# build_in_place STEP_TIMEOUT: the extension for this card only (one compile of each
# kernel, nothing fetched from a network that is not there: a pip install could fall
# back and compile everything twice), then checks it imports with CUDA kernels. Sets
# BUILT=yes or no.
# The build runs CMake (setup.py): an image without cmake gets the cmake and ninja wheels
# carried in .whl/ (call with carry [".whl"]; fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
#     -d .whl cmake ninja
# 31 MB), installed into /tmp/build-tools.
build_in_place() {
  export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 TDPO_EXT_CUDA=1
  BUILD_SETTINGS="TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=16, TDPO_EXT_CUDA=1, setup.py build_ext --inplace"
  BUILT=no
  if ! command -v cmake > /dev/null && ! "$PY" -c "import cmake" 2> /dev/null; then
    shopt -s nullglob
    local tools=(.whl/cmake-*.whl .whl/ninja-*.whl)
    shopt -u nullglob
    run_step build_tools 120 build_tools.log "$PY" -m pip install -q --no-index --no-deps \
      --no-compile --target /tmp/build-tools "${tools[@]}" || return
    export PYTHONPATH=/tmp/build-tools${PYTHONPATH:+:$PYTHONPATH}
  fi
  run_step build "$1" build.log "$PY" setup.py build_ext --inplace || return
  if "$PY" -c "import sys, tdpo_ext; sys.exit(not tdpo_ext.built_with_cuda())" \
       >> "$OUT/build.log" 2>&1; then
    BUILT=yes
  else
    note "the build finished but tdpo_ext does not import with CUDA kernels (see build.log)"
    FAILED=1
  fi
}
