"""Weight quantization: bytes, held-out perplexity, MMLU and CPU decode speed of bf16 / int8 / int4 / fp8.

    python bench/quant.py                         # the bundled model (dsv3.bundled_model_path()), one table
    python bench/quant.py --model DIR --no-mmlu   # another checkpoint with tokenizer files; skip MMLU

Rows: bf16 (the baseline), int8 (per channel), int4 g32 and g128 (input widths that 128 does not divide are
zero-padded, and the padding is counted), fp8 (DeepSeek's 128x128 blocks; no fused FP8 kernel on a CPU, so its
forward dequantises each weight: the "reference" path).
- bytes: the quantized layers (packed weights + scales) against the same layers in bf16, and the whole model
  (embedding, lm_head, router and norms stay bf16/fp32 in every row; the MTP layer counts too).
- perplexity: exp(mean NLL) over the first --tokens tokens of data/corpus/valid.txt, in --seq-len windows.
- MMLU: dsv3.eval.mmlu on the shipped validation subset (857 questions, or --mmlu-limit per subject; 0-shot,
  log-likelihood of " A".." D").
- decode: ms per generated token at batch 1, greedy, after a 64-token prompt: (t(N tokens) - t(1 token)) / (N-1),
  best of --repeats, all variants in this one process (taking turns) with --threads torch threads.
- layer matvec: one linear at batch 1 (x [1, in]) in the shapes of DeepSeek-V3's big matrices, where reading the
  weight is the cost: a model as small as the bundled one is bound by per-op overhead on a CPU instead, so its
  decode row says little about what 4-bit weights do for a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dsv3
from dsv3.quant import quantize, quantized_layers

VARIANTS = {  # label -> (scheme, quantize kwargs)
    "bf16": (None, {}),
    "int8": ("int8", {}),
    "int4 g32": ("int4", {"group_size": 32, "pad": True}),
    "int4 g128": ("int4", {"group_size": 128, "pad": True}),
    "fp8": ("fp8", {}),
}
REPO = Path(__file__).resolve().parents[1]


def load_variant(path: Path, label: str) -> torch.nn.Module:
    """The checkpoint in bf16, quantized as `label` says (VARIANTS)."""
    model = dsv3.load_pretrained(path, dtype=torch.bfloat16)
    scheme, kwargs = VARIANTS[label]
    return quantize(model, scheme, **kwargs) if scheme else model


def nbytes(model: torch.nn.Module) -> dict[str, int]:
    """{"layers": bytes of the quantized layers, "layers_bf16": the same layers in bf16, "model": all tensors}."""
    layers = quantized_layers(model)
    return {"layers": sum(m.nbytes() for m in layers.values()),
            "layers_bf16": sum(2 * m.in_features * m.out_features for m in layers.values()),
            "model": sum(t.numel() * t.element_size() for t in model.state_dict().values())}


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, batch: int = 8) -> float:
    """ids: [N] token ids -> exp(mean next-token NLL) over non-overlapping windows of seq_len + 1 tokens."""
    n = (ids.numel() - 1) // seq_len
    windows = torch.stack([ids[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])  # [n, seq_len + 1]
    total, count = 0.0, 0
    for rows in windows.split(batch):
        logits = model(rows[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    return math.exp(total / count)


def decode_ms(models: dict[str, torch.nn.Module], prompt: torch.Tensor, new_tokens: int,
              repeats: int = 3) -> dict[str, float]:
    """ms per decoded token at batch 1 (prefill excluded): (t(new_tokens) - t(1)) / (new_tokens - 1), best run.

    The variants take turns within each repeat, so load from other processes on the machine hits them alike.
    """
    def timed(model: torch.nn.Module, n: int) -> float:
        start = time.perf_counter()
        dsv3.generate(model, prompt, n)
        return time.perf_counter() - start

    for model in models.values():
        dsv3.generate(model, prompt, 4)  # warm-up: int4 repacks into the kernel layout, allocator primed
    best = {label: math.inf for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            best[label] = min(best[label], (timed(model, new_tokens) - timed(model, 1)) / (new_tokens - 1) * 1000)
    return best


def mmlu_accuracy(model: torch.nn.Module, tokenizer, limit: int | None) -> float:
    from dsv3.eval.mmlu import run_mmlu, summarize
    from dsv3.eval.mmlu_data import load_mmlu
    from dsv3.eval.mmlu_scorers import ModelScorer

    data = load_mmlu(None, "validation", limit=limit)
    preds = run_mmlu(ModelScorer(model, tokenizer, batch_size=16), data, shots=0, progress=False)
    return summarize(preds)["overall"]["micro"]


MATVEC_SHAPES = {"V3 expert gate/up [2048, 7168]": (2048, 7168), "V3 o_proj [7168, 16384]": (7168, 16384),
                 "4096 x 4096": (4096, 4096)}


@torch.inference_mode()
def matvec_us(out_dim: int, in_dim: int, repeats: int = 20) -> dict[str, float]:
    """µs per x[1, in] @ Wᵀ for bf16, int8 and int4 g32/g128 (kernel paths), median of `repeats` after warm-up."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_dim, out_dim, bias=False, dtype=torch.bfloat16)
    layers = {"bf16": dense}
    for label in ("int8", "int4 g32", "int4 g128"):
        scheme, kwargs = VARIANTS[label]
        holder = torch.nn.Sequential(dense)
        layers[label] = quantize(holder, scheme, skip=(), **kwargs)[0]
    x = torch.randn(1, in_dim, dtype=torch.bfloat16)
    out = {}
    for label, layer in layers.items():
        for _ in range(3):
            layer(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
        out[label] = sorted(times)[len(times) // 2] * 1e6
    return out


def forward_path(model: torch.nn.Module) -> str:
    x = torch.zeros(1, 1)
    layers = list(quantized_layers(model).values())
    if not layers:
        return "dense"
    return "kernel" if all(m.kernel_available(x.to(torch.bfloat16)) for m in layers) else (
        "reference" if not any(m.kernel_available(x.to(torch.bfloat16)) for m in layers) else "mixed")


def run(path: Path, labels: list[str], tokens: int, seq_len: int, new_tokens: int, mmlu: bool,
        mmlu_limit: int | None, repeats: int) -> list[dict]:
    tokenizer = dsv3.Tokenizer.from_pretrained(path)
    ids = torch.tensor(tokenizer.encode((REPO / "data/corpus/valid.txt").read_text(), add_special_tokens=False))
    ids = ids[:tokens + 1]
    prompt = ids[None, :64]
    rows, models = [], {}
    for label in labels:
        model = models[label] = load_variant(path, label)
        row = {"variant": label, "path": forward_path(model), **nbytes(model),
               "ppl": perplexity(model, ids, seq_len)}
        row["mmlu"] = mmlu_accuracy(model, tokenizer, mmlu_limit) if mmlu else None
        rows.append(row)
        print(f"  {label}: bytes, perplexity{', MMLU' if mmlu else ''} done", flush=True)
    for row, ms in zip(rows, decode_ms(models, prompt, new_tokens, repeats).values()):
        row["decode_ms"] = ms
    return rows


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["variant"] == "bf16")
    head = (f"{'variant':<10} {'forward':<9} {'layers MiB':>10} {'vs bf16':>8} {'model MiB':>10} {'vs bf16':>8} "
            f"{'ppl':>8} {'Δppl':>7} {'MMLU':>6} {'ms/tok':>7} {'vs bf16':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        layers = r["layers"] / r["layers_bf16"] if r["layers_bf16"] else 1.0
        mmlu = f"{100 * r['mmlu']:5.1f}%" if r["mmlu"] is not None else "   n/a"
        lines.append(f"{r['variant']:<10} {r['path']:<9} {r['layers'] / 2**20:>10.2f} {layers:>8.3f} "
                     f"{r['model'] / 2**20:>10.2f} {r['model'] / base['model']:>8.3f} {r['ppl']:>8.3f} "
                     f"{100 * (r['ppl'] / base['ppl'] - 1):>+6.2f}% {mmlu} {r['decode_ms']:>7.2f} "
                     f"{r['decode_ms'] / base['decode_ms']:>7.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint dir with tokenizer files (default: the bundled model)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens for perplexity")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timing run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mmlu", dest="mmlu", action="store_false")
    ap.add_argument("--mmlu-limit", type=int, default=None, help="questions per subject (default: all 857)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = args.model or dsv3.bundled_model_path()
    labels = ["bf16"] + [v for v in args.variants if v != "bf16"]
    rows = run(path, labels, args.tokens, args.seq_len, args.new_tokens, args.mmlu, args.mmlu_limit, args.repeats)
    print(f"\n{path} | {args.tokens} held-out tokens, windows of {args.seq_len} | decode batch 1, "
          f"{args.new_tokens} tokens, {args.threads} thread(s), torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(table(rows))
    print("\nlayer matvec at batch 1, µs (median; x [1, in] bf16, kernels as above):")
    matvec = {name: matvec_us(*shape) for name, shape in MATVEC_SHAPES.items()}
    print(f"{'shape':<32}" + "".join(f"{k:>16}" for k in next(iter(matvec.values()))))
    for name, times in matvec.items():
        print(f"{name:<32}" + "".join(f"{t:>9.0f} ({times['bf16'] / t:.2f}x)" for t in times.values()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "matvec_us": matvec}, indent=2) + "\n")


if __name__ == "__main__":
    main()
