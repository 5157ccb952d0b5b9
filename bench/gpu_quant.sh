#!/usr/bin/env bash
# Decode speed of bf16 against int8 / int4 weights on a GPU, on a DeepSeek-V2-Lite-shaped random model:
# hidden 2048, 16 heads, no q-LoRA, kv_lora 512, 64 routed experts (top-6) + 2 shared of width 1408, first layer
# dense (10944; padded to 11008 for int4 g128), 12 layers, vocab 102400 (~6.9B parameters, ~14 GB in bf16).
#
#   bash bench/gpu_quant.sh [NEW_TOKENS=128]
#
# Per variant: build the model (seeded, bf16 on cuda), quantize it (lm_head, embedding, router stay bf16/fp32),
# check the weight bytes, decode NEW_TOKENS tokens greedily at batch 1 after a 32-token prompt, and report ms/token
# = (t(N) - t(1)) / (N - 1), best of 3, plus a batch-1 matvec of one expert's gate_proj and of o_proj.
# Kernels: int4 -> aten._weight_int4pack_mm (tinygemm, sm80+), int8 -> (x @ qᵀ) · scale, fp8 -> F.scaled_mm with
# 1x128 / 128x128 block scales (sm90). Eager PyTorch: MoE dispatch is a Python loop over experts, so launch overhead
# is part of every row; the matvec rows show the kernels alone. Goal from issue 6: int4 >= 1.6x faster than bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
NEW_TOKENS="${1:-128}" python - <<'PY'
import gc, os, time
import torch
import dsv3
from dsv3.quant import quantize, quantized_layers

if not torch.cuda.is_available():
    raise SystemExit("bench/gpu_quant.sh needs a CUDA GPU")
new_tokens = int(os.environ["NEW_TOKENS"])
config = dsv3.ModelConfig(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
    moe_intermediate_size=1408, num_hidden_layers=12, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1, scoring_func="softmax",
    topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=4096)
VARIANTS = {"bf16": None, "int8": ("int8", {}), "int4 g128": ("int4", {"group_size": 128, "pad": True}),
            "int4 g32": ("int4", {"group_size": 32})}
if torch.cuda.get_device_capability() == (9, 0):
    VARIANTS["fp8"] = ("fp8", {})


def build():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = dsv3.Transformer(config)
    return model.to(torch.bfloat16).eval()


def sync_time(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def matvec_us(layer, in_dim):
    x = torch.randn(1, in_dim, dtype=torch.bfloat16, device="cuda")
    for _ in range(5):
        layer(x)
    runs = 200
    return sync_time(lambda: [layer(x) for _ in range(runs)]) / runs * 1e6


prompt = torch.randint(0, config.vocab_size, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
rows = []
for label, spec in VARIANTS.items():
    model = build()
    if spec:
        quantize(model, spec[0], **spec[1])
    layers = quantized_layers(model)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dsv3.generate(model, prompt, 4)  # warm-up (int4 repacks into the tinygemm layout here)
    with torch.inference_mode():
        per_token = min((sync_time(lambda: dsv3.generate(model, prompt, new_tokens))
                         - sync_time(lambda: dsv3.generate(model, prompt, 1))) / (new_tokens - 1) for _ in range(3))
        block = model.model.layers[1]
        gate = block.mlp.experts[0].gate_proj
        o_proj = block.self_attn.o_proj
        rows.append(dict(variant=label, path=("kernel" if all(m.kernel_available(prompt.new_zeros(1, 1,
                    dtype=torch.bfloat16)) for m in layers.values()) else "reference") if layers else "dense",
                         gib=weight_bytes / 2**30, ms=per_token * 1e3, gate_us=matvec_us(gate, 2048),
                         o_us=matvec_us(o_proj, 2048), peak=torch.cuda.max_memory_allocated() / 2**30))
    print(rows[-1], flush=True)
    del model, layers, block, gate, o_proj
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

base = rows[0]
print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | V2-Lite-shaped, 12 layers | batch 1, "
      f"{new_tokens} new tokens")
print(f"{'variant':<10} {'forward':<9} {'weights GiB':>11} {'vs bf16':>8} {'ms/token':>9} {'speed-up':>9} "
      f"{'expert gate µs':>15} {'o_proj µs':>10} {'peak GiB':>9}")
for r in rows:
    print(f"{r['variant']:<10} {r['path']:<9} {r['gib']:>11.2f} {r['gib'] / base['gib']:>8.3f} {r['ms']:>9.2f} "
          f"{base['ms'] / r['ms']:>8.2f}x {r['gate_us']:>15.1f} {r['o_us']:>10.1f} {r['peak']:>9.2f}")
PY
