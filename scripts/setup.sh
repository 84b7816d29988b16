#!/usr/bin/env bash
# Installs what tdpo-ext needs on a fresh machine and builds the extension in place.
# Used by scripts/test.sh and scripts/train.sh; safe to run again (skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TDPO_TORCH_VERSION:-2.14.1}

if ! $PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "== installing torch==$TORCH_VERSION"
  $PY -m pip install --quiet "torch==$TORCH_VERSION"
fi
$PY -m pip install --quiet cmake ninja pybind11 numpy "$@"
# Rebuild only when no built extension is in place or a source or build file is newer than it.
built=$(ls tdpo_ext/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$built" ] && [ -z "$(find csrc setup.py CMakeLists.txt -newer "$built" -print -quit)" ] \
    && $PY -c "import tdpo_ext" 2>/dev/null; then
  echo "== tdpo_ext is built and current ($built)"
else
  echo "== building tdpo_ext (pip install --no-build-isolation -e .)"
  $PY -m pip install --quiet --no-build-isolation --no-deps -e .
fi
$PY -c "import tdpo_ext; print('tdpo_ext', tdpo_ext.__version__, '| CUDA kernels:', tdpo_ext.built_with_cuda())"
