#!/usr/bin/env bash
# gpu_check.sh -- every GPU claim of the repo, measured in one command on one H100/H200 (< 10 minutes).
#
#   bash gpu_check.sh [OUT_DIR]              # default OUT_DIR: runs/gpu_check
#   SMOKE=1 bash gpu_check.sh /tmp/check     # the same four steps at toy sizes on a CPU: checks the script
#   TEST_FILE=... PYTHON=...                 # another test file / interpreter (defaults: test_all.py, python)
#
# Four steps, each under its own time limit; a failing step is recorded and the next one still runs:
#   1. the kernel tests, compiled and autotuned (python -m pytest -q test_all.py -k kernels)
#   2. the kernel benchmarks (bench.py): FA2 vs SDPA-flash, torch.compile and eager, forward and
#      forward+backward at causal d64 T4096 bf16; RMSNorm fwd+bwd vs torch.compile, with % of HBM bandwidth
#   3. the 124M model (d768, 12 layers, 12 heads, T1024, vocab 50304) trained a few steps in bf16 with
#      --compile on random uint16 tokens: median step time, tok/s and MFU from train.py's metrics.jsonl
#   4. the tiny pipeline on cuda (python pipeline.py --preset tiny), data to aligned model and report
# Results: OUT_DIR/gpu_check_results.txt (a summary per step, then its tail); full logs in OUT_DIR/logs/.
set -u
OUT_ARG=${1:-$(dirname "$0")/runs/gpu_check}  # a relative OUT_DIR is relative to where you run this from
OUT=$(mkdir -p "$OUT_ARG" && cd "$OUT_ARG" && pwd) || exit 1
cd "$(dirname "$0")"
PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
TEST_FILE=${TEST_FILE:-test_all.py}  # the assembled suite; another file of the same tests works too
RES="$OUT/gpu_check_results.txt"
mkdir -p "$OUT/logs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ "$SMOKE" != 1 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to torch; run this on the GPU machine (or SMOKE=1 for a CPU dry run)" >&2
    exit 1
fi

# sizes: the real check, or toy ones that only prove every step starts and finishes (SMOKE=1)
if [ "$SMOKE" = 1 ]; then
    TEST_K="kernels and not slow"; BENCH_FLAGS="--kernels-tiny"
    MODEL="--d-model 64 --num-layers 2 --num-heads 2 --context-length 64 --batch-size 4"
    STEPS=6; TOKENS=200000; SLOW=3  # a 2-core CPU compiles and interprets slowly: 3x the time limits
else
    TEST_K="kernels"; BENCH_FLAGS=""
    MODEL="--d-model 768 --num-layers 12 --num-heads 12 --context-length 1024 --batch-size 16"
    STEPS=40; TOKENS=20000000; SLOW=1
fi

# run NAME LIMIT_S CMD...: run one step with a time limit, log it, append its summary to the results
run() {
    local name=$1 limit=$(($2 * SLOW)); shift 2
    local log="$OUT/logs/$name.log" t0=$SECONDS rc
    echo "== $name: $*" | tee "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    [ $rc = 124 ] && echo "(killed: over the ${limit} s limit)" >>"$log"
    printf '\n== %s: rc %s, %s s (limit %s s)\n$ %s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" "$*" >>"$RES"
    echo "   rc $rc, $((SECONDS - t0)) s"
    return $rc
}

{
    echo "gpu_check $(date -u +%FT%TZ) | commit $(git rev-parse --short HEAD 2>/dev/null || echo none)$([ "$SMOKE" = 1 ] && echo ' | SMOKE (toy sizes, not numbers)')"
    $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|',
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null
} >"$RES"

# 1. compiled kernel tests (the interpreter-only checks skip themselves on a GPU)
run test_kernels 240 $PY -m pytest -q "$TEST_FILE" -k "$TEST_K" -p no:cacheprovider
tail -n 3 "$OUT/logs/test_kernels.log" >>"$RES"

# 2. kernel benchmarks: full size on a GPU (B4 H16 T4096 d64 bf16; RMSNorm 16384x4096)
run bench_kernels 180 $PY bench.py --only kernels $BENCH_FLAGS
grep -E "^(NVIDIA|cpu|rmsnorm|flash-attn|name |rmsnorm_|flash_attn_)" "$OUT/logs/bench_kernels.log" >>"$RES"

# 3. 124M bf16 + torch.compile step time and MFU, on random tokens (no tokenizer, vocab 50304)
$PY - "$WORK/data" "$TOKENS" <<'EOF'
import os, sys
import numpy as np
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)
rng.integers(0, 50304, n, dtype=np.uint16).tofile(os.path.join(out, "train.bin"))
rng.integers(0, 50304, n // 20 + 10000, dtype=np.uint16).tofile(os.path.join(out, "val.bin"))
EOF
run train_124m 240 $PY train.py --data "$WORK/data" --out-dir "$WORK/train" --vocab-size 50304 $MODEL --compile \
    --max-steps $STEPS --warmup-steps 5 --eval-every 1000 --eval-steps 2 --ckpt-every 1000 --sample-every 0
$PY - "$WORK/train/metrics.jsonl" >>"$RES" 2>&1 <<'EOF'
import json, statistics, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if "ms" in r and "tok_per_s" in r]
skip = min(10, len(steps) // 2)  # step 1 compiles; the first few also warm up the allocator and autotuner
rows = steps[skip:]
ms = statistics.median(r["ms"] for r in rows)
mfu = [r["mfu"] for r in rows if r.get("mfu") is not None]
print(f"train: median of steps {skip + 1}-{len(steps)}: {ms:.1f} ms/step, "
      f"{statistics.median(r['tok_per_s'] for r in rows) / 1e3:.1f}k tok/s, "
      + (f"MFU {100 * statistics.median(mfu):.1f}% (goal >= 50%)" if mfu else "MFU n/a (peak unknown)"))
EOF
grep -E "^step " "$OUT/logs/train_124m.log" | tail -n 3 >>"$RES"
cp "$WORK/train/metrics.jsonl" "$OUT/train_124m_metrics.jsonl" 2>/dev/null

# 4. the tiny pipeline on cuda (every stage autodetects the GPU)
run pipeline_tiny 240 $PY pipeline.py --preset tiny --out "$WORK/pipeline"
tail -n 15 "$OUT/logs/pipeline_tiny.log" >>"$RES"
cp "$WORK/pipeline/report.md" "$OUT/pipeline_tiny_report.md" 2>/dev/null

echo "
== total: $SECONDS s" >>"$RES"
echo "results: $RES"
grep -E "^== " "$RES"
