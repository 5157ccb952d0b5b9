#!/usr/bin/env bash
# Dense MLA vs DSA vs sliding window on a GPU, contexts 1k..64k, k = 2048 (V3.2-Exp's index_topk) and k = 256.
# Same model and code paths as bench/attention.py (pure PyTorch: gathered top-k, no FlashMLA/DeepGEMM kernels).
# Usage: bash bench/gpu_attention.sh [out_dir]   (needs CUDA; writes attention_gpu_k{256,2048}.{md,json})
set -euo pipefail
out=${1:-bench/results}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu_attention.sh: no CUDA device')"
for k in 256 2048; do
  python bench/attention.py --device cuda --topk "$k" \
    --contexts 1024 2048 4096 8192 16384 32768 65536 \
    --json "$out/attention_gpu_k$k.json" | tee "$out/attention_gpu_k$k.md"
done
