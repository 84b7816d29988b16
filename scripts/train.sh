#!/usr/bin/env bash
# The README's main job: set up a fresh machine, then run tdpo-train's embedded default
# (SFT of the tiny built-in GPT, preference pairs ranked by VADER sentiment, TDPO2, reward
# before/after; about 2-4 minutes on 2 CPU cores). Extra arguments go to tdpo-train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh tqdm matplotlib vadersentiment
# Huge pages for torch's large CPU tensors: fewer first-touch faults (README, Performance).
export THP_MEM_ALLOC_ENABLE=${THP_MEM_ALLOC_ENABLE:-1}
python3 -m tdpo_ext.training.train "$@"   # the same as the tdpo-train console script
