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
python3 -m pytest tests "$@"
# The TRL tests again on the oldest TRL release in requirements/trl.txt's range (the run
# above had the newest, which setup.sh installs on a fresh machine), in a venv of its own that sees this environment's packages and
# build: only TRL is its own, since the range's releases ask the same of their dependencies.
oldest=$(sed -n 's/^trl>=\([0-9.]*\),.*/\1/p' requirements/trl.txt)
venv=$(mktemp -d)/trl-$oldest
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet --no-deps "trl==$oldest.*"
"$venv/bin/python" -m pytest tests/test_trl.py tests/test_trl_cli.py tests/test_trl_versions.py "$@"
