#!/usr/bin/env bash
# The README's test command: set up a fresh machine, build, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The training tests need the "train" extra too (matplotlib, transformers, VADER), the TRL
# tests the "trl" extra.
bash scripts/setup.sh pytest hypothesis tqdm matplotlib vadersentiment transformers tokenizers \
  -r requirements/trl.txt
python3 -m pytest tests "$@"
