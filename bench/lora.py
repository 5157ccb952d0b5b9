"""Full fine-tuning vs LoRA vs QLoRA (int4 base) on the bundled model: trainable share, memory, step time.

    python bench/lora.py [--model DIR] [--rank 16] [--batch 4] [--seq 128] [--steps 5] [--device cpu|cuda]

Each setup trains the same next-token loss with AdamW for a few steps on random tokens. Columns:
- trainable: parameters that receive gradients, and their share of all parameters (base + adapters; the int4
  base counts its original parameters);
- weights: bytes of the model's tensors as stored (int4 layers count their packed weights and scales);
- grads + AdamW: bytes of the gradients and of AdamW's state (exp_avg + exp_avg_sq per trainable parameter),
  measured from the optimizer after a step;
- step: median wall time of forward + backward + optimizer step.
LoRA and QLoRA adapt every linear of attention, MLPs and experts (QLoRA paper's choice), rank r, alpha 2r;
"LoRA attn" only the attention projections (`dsv3 finetune`'s default).
Without --model it uses the bundled model, or its config (scripts/bundled/config.json) with random weights if the
weights are not there. float32 on CPU, bfloat16 on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dsv3
from dsv3.lora import apply_lora, quantized_reference_forward

ROOT = Path(__file__).resolve().parents[1]


def load_base(path: str | None, dtype: torch.dtype, device: str) -> tuple[dsv3.Transformer, str]:
    try:
        path = path or dsv3.bundled_model_path()
        return dsv3.load_pretrained(path, dtype=dtype, device=device), str(path)
    except FileNotFoundError:
        config = dsv3.ModelConfig.from_hf(json.loads((ROOT / "scripts/bundled/config.json").read_text()))
        torch.manual_seed(0)
        return dsv3.Transformer(config).to(device=device, dtype=dtype), "bundled config, random weights"


def tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def measure(model: dsv3.Transformer, ids: torch.Tensor, steps: int, base_params: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    times = []
    with quantized_reference_forward(model):
        for _ in range(steps + 1):  # the first step is warm-up
            if ids.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ids.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    trainable = sum(p.numel() for p in params)
    adapters = trainable if trainable < base_params else 0
    return dict(trainable=trainable, share=trainable / (base_params + adapters), weights=tensor_bytes(model), grads=grads,
                adamw=state, step=statistics.median(times[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (must divide every input width)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from dsv3 import quant

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base, source = load_base(args.model, dtype, args.device)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    setups = {
        "full fine-tune": lambda: copy.deepcopy(base),
        f"LoRA r={args.rank} attn": lambda: apply_lora(copy.deepcopy(base), args.rank, 2 * args.rank,
                                                      ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                       "o_proj"]),
        f"LoRA r={args.rank}": lambda: apply_lora(copy.deepcopy(base), args.rank, 2 * args.rank, "all-linear"),
        f"QLoRA int4 r={args.rank}": lambda: apply_lora(quant.quantize(copy.deepcopy(base), "int4",
                                                                      group_size=args.group_size),
                                                        args.rank, 2 * args.rank, "all-linear"),
    }
    print(f"model: {source}; {base.num_parameters(include_mtp=True) / 1e6:.2f}M parameters; {args.device} {dtype}; "
          f"batch {args.batch} x {args.seq} tokens; {torch.get_num_threads()} threads")
    print(f"{'setup':<20} {'trainable':>12} {'share':>8} {'weights MiB':>12} {'grads MiB':>10} {'AdamW MiB':>10} "
          f"{'step ms':>9}")
    for name, make in setups.items():
        torch.manual_seed(0)
        r = measure(make(), ids, args.steps, sum(p.numel() for p in base.parameters()))
        mib = 2 ** 20
        print(f"{name:<20} {r['trainable']:>12,} {100 * r['share']:>7.2f}% {r['weights'] / mib:>12.2f} "
              f"{r['grads'] / mib:>10.2f} {r['adamw'] / mib:>10.2f} {1e3 * r['step']:>9.1f}")


if __name__ == "__main__":
    main()
