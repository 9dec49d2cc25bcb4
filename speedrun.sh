#!/usr/bin/env bash
# The whole pipeline in one command: install, then data -> tokenizer -> pretrain -> SFT -> DPO -> GRPO -> report.md.
#   bash speedrun.sh                 # embedded corpus, CPU, ~20 min on 2 cores
#   bash speedrun.sh --preset gpu    # bigger, ~1 h on one H100
#   bash speedrun.sh --fresh         # redo every stage (otherwise finished stages are skipped)
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
python3 pipeline.py "$@"
