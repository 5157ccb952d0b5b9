#!/usr/bin/env bash
# Every GPU figure and check in one run (issues 20 and 21; about 6-7 minutes on an H200 with --quick):
#   1. tests marked `gpu` (kernels against their references; they skip without CUDA elsewhere) and
#      `inductor_codegen` (inductor's generated code),
#   2. bench/gpu_quant.sh: bf16 vs int8 / int4 / fp8 weights (decode eager and compiled, matvecs),
#   3. bench/decode.py: dsv3 vs transformers vs the bandwidth / compute floor for decode ms/token at batch 1,
#      tokens/s at batch 8 and 64 and prefill TFLOP/s at 2048 tokens, eager and compiled, on the V2-Lite-shaped
#      random bf16 model, with a warm-up (compile) time per row,
#   4. bench/serve.py: `dsv3 serve` on the V2-Lite-shaped model under 1, 8, 32 and 128 streaming clients (requests/s,
#      tokens/s, TTFT and inter-token latency p50/p99) and the prefix cache's TTFT gain; the servers' decode step
#      compiled with CUDA graphs (their default on a GPU), or eager with --quick (starts in seconds),
#   5. bench/distributed.py --backend nccl --worlds 1: the model in a one-rank NCCL group against the plain path,
#      and what its collectives would cost per step,
#   6. bench/gpu_ceilings.py: the card's copy bandwidth and bf16 matmul rate, SDPA and MoE kernel choices, and the
#      routed down projection as inductor compiles it against the Triton kernel (dsv3/fast/triton_moe.py).
# Each stage's output is saved to DIR/<stage>.txt and the decode step's kernel timeline to DIR/prof/ (with
# --profile); the stages share one inductor cache, so kernels compiled by one are reused by the next.
#
#   bash bench/gpu.sh --quick --out DIR       # a short lease: targets only (no transformers rows)
#   bash bench/gpu.sh --out DIR --profile     # everything, with the kernel timeline of the compiled steps
#   bash bench/gpu.sh --dry-run               # CPU, tiny models: checks the script (a minute)
#   bash bench/gpu.sh --stages decode,serve   # only these stages (of tests, quant, decode, serve, distributed, ceilings)
# Other flags go to bench/decode.py (e.g. --bandwidth 3.0e12 for an H100 SXM, whose copy bandwidth is lower).
set -uo pipefail
cd "$(dirname "$0")/.."
out=runs/gpu-$(date +%Y%m%d-%H%M%S)
dry=0 profile=0 quick=0 pass=() stages=tests,quant,decode,serve,distributed,ceilings
while (($#)); do
    case "$1" in
        --out) out="$2"; shift ;;
        --stages) stages="$2"; shift ;;
        --profile) profile=1 ;;
        --dry-run) dry=1; pass+=("$1") ;;
        --quick) quick=1; pass+=("$1") ;;
        *) pass+=("$1") ;;
    esac
    shift
done
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$out/inductor-cache}"
((profile)) && pass+=(--profile "$out/prof")
status=0
stage() {  # stage NAME COMMAND...: run it (if --stages names it), tee its output to $out/NAME.txt, print its time
    local name="$1" start=$SECONDS
    shift
    [[ ",$stages," == *",$name,"* ]] || return 0
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    ((rc == 0)) || status=1
}
if ((dry)); then
    stage decode python bench/decode.py --no-compile "${pass[@]}"
    stage quant bash bench/gpu_quant.sh --dry-run
    stage serve python bench/serve.py --clients 1 2 --requests 4 --max-tokens 4 --conversations 1 --turns 2 \
        --system-tokens 100
    exit $status
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader || true
# the test files holding GPU or inductor-codegen checks (collecting all of tests/ would import the server stack),
# in this one process: pyproject's addopts (pytest-xdist workers) are dropped, one GPU runs one test at a time
stage tests python -m pytest -o addopts= -p no:xdist -m "gpu or inductor_codegen" -q -p no:cacheprovider \
    $(grep -l -e "mark.gpu" -e "mark.inductor_codegen" tests/test_*.py)
stage quant bash bench/gpu_quant.sh $( ((quick)) && echo --budget 0)  # --quick: eager rows and matvecs only
stage decode python bench/decode.py "${pass[@]}"
if ((quick)); then  # eager servers (seconds to start) and fewer requests
    stage serve python bench/serve.py --shape v2-lite --eager --clients 1 8 32 128 --requests 128 --max-tokens 32 \
        --threads 4 --conversations 2 --turns 3
else
    stage serve python bench/serve.py --shape v2-lite --clients 1 8 32 128 --requests 256 --max-tokens 64 \
        --threads 4 --conversations 3 --turns 4
fi
# NCCL with one rank against the plain path (issue 22): what a collective costs on this card
stage distributed python bench/distributed.py --backend nccl --worlds 1
stage ceilings python bench/gpu_ceilings.py $( ((quick)) && echo --quick)
echo "outputs in $out"
exit $status
