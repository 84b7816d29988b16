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
