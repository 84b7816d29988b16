#!/usr/bin/env bash
# The README's test command: set up a fresh machine, build, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The training tests need the "train" extra too (matplotlib, transformers, VADER), the TRL
# tests the "trl" extra, and the ZeRO-3 one DeepSpeed (pure Python as installed: its ops are
# compiled on first use, and ZeRO on CPU uses none; not in the extra, which DDP and FSDP users
# do not need).
bash scripts/setup.sh pytest hypothesis tqdm matplotlib vadersentiment transformers tokenizers \
  "deepspeed>=0.19,<0.20" -r requirements/trl.txt
status=0
python3 -m pytest tests "$@" || status=$?
# On a CPU with AVX512, the op tests again on the AVX2 paths (torch's, and our kernels',
# which follow torch's choice): what a CPU without AVX512 runs. Every run must pass.
if [ "$(python3 -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')" = AVX512 ]
then
  ATEN_CPU_CAPABILITY=avx2 python3 -c "import torch; from tdpo_ext import _C; print('== the op tests again under \
ATEN_CPU_CAPABILITY=avx2: torch', torch.backends.cpu.get_cpu_capability(), '| tdpo_ext', \
_C.cpu_kernel_capability())"
  ATEN_CPU_CAPABILITY=avx2 python3 -m pytest tests/test_facts.py tests/test_token_stats_kl.py \
    tests/test_token_stats_tile.py tests/test_policy_metrics.py tests/test_sequence_stats.py \
    tests/test_preference_loss.py tests/test_tdpo_loss.py tests/test_fused_linear.py \
    tests/test_lm_head.py tests/test_errors.py tests/test_opcheck.py "$@" || status=$?
fi
# The TRL tests again on the oldest TRL release in requirements/trl.txt's range (the run
# above had the newest, which setup.sh installs), in a venv of its own that sees this
# environment's packages and build: only TRL is its own, since the range's releases ask
# the same of their dependencies.
oldest=$(sed -n 's/^trl>=\([0-9.]*\),.*/\1/p' requirements/trl.txt)
echo "== the TRL tests again on TRL $oldest"
venv_python=$(python3 tests/environments.py "$(mktemp -d)/trl-$oldest")
"$venv_python" -m pip install --quiet --no-deps "trl==$oldest.*"
"$venv_python" -m pytest tests/test_trl.py tests/test_trl_cli.py tests/test_trl_versions.py \
  "$@" || status=$?
exit $status
