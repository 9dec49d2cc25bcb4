#!/usr/bin/env bash
# The whole pipeline in one command: install, then data -> tokenizer -> pretrain -> SFT -> DPO -> GRPO -> report.md.
#   bash speedrun.sh                 # embedded corpus, CPU: ~5.5 min on 2 quiet cores (plus the install)
#   bash speedrun.sh --preset gpu --url URL   # 124M-class on real data, meant for one H100 (untested)
#   bash speedrun.sh --fresh         # redo every stage (otherwise finished stages are skipped)
set -euo pipefail
cd "$(dirname "$0")"
# torch first, matched to the machine: PyPI's Linux wheel is the multi-GB CUDA build, which a machine
# without an NVIDIA GPU cannot use, so there we take the CPU build (falling back to whatever pip offers).
if ! python3 -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        python3 -m pip install -q torch                      # NVIDIA GPU: the CUDA build
    else
        python3 -m pip install -q --timeout 30 --retries 1 torch --index-url https://download.pytorch.org/whl/cpu \
            || python3 -m pip install -q torch==2.13.0 || python3 -m pip install -q torch
    fi
fi
python3 -m pip install -q -r requirements.txt
python3 pipeline.py "$@"
