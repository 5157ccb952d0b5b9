#!/usr/bin/env bash
# Issue 9's GPU figures in one run (a few minutes on an H100/H200): builds the V2-Lite-shaped random bf16 model,
# checks dsv3's logits and greedy tokens against transformers, and prints dsv3 vs transformers vs the bandwidth /
# compute floor for decode ms/token at batch 1 (eager and torch.compile), tokens/s at batch 8 and 64, and prefill
# TFLOP/s at 2048 tokens (eager and torch.compile). bench/gpu_ceilings.py first measures the card's copy bandwidth
# and bf16 matmul rate (pass them as --bandwidth/--peak where they differ from the H200 defaults). See
# bench/decode.py for the definitions.
#
#   bash bench/gpu.sh                         # on a GPU (H200 floors by default)
#   bash bench/gpu.sh --bandwidth 3.0e12      # H100 SXM: pass the card's measured copy bandwidth
#   bash bench/gpu.sh --dry-run               # CPU, tiny model: checks the script (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --dry-run "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader || true
    python bench/gpu_ceilings.py || true  # the card's bandwidth and matmul rate, SDPA and MoE kernel choices
fi
exec python bench/decode.py "$@"
