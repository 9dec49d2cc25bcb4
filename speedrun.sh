#!/usr/bin/env bash
# The whole pipeline in one command: install, then data -> tokenizer -> pretrain -> SFT -> DPO -> GRPO -> report.md.
#   bash speedrun.sh                 # embedded corpus, CPU: ~6.5 min on 2 quiet cores (plus the install)
#   bash speedrun.sh --preset gpu --url URL   # 124M-class on real data, meant for one H100 (untested)
#   bash speedrun.sh --fresh         # redo every stage (otherwise finished stages are skipped)
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
python3 pipeline.py "$@"
