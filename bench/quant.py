"""Weight quantization: bytes, held-out perplexity, MMLU and CPU decode speed of bf16 / int8 / int4 / fp8.

    python bench/quant.py                         # the bundled model (dsv3.bundled_model_path()), one table
    python bench/quant.py --model DIR --no-mmlu   # another checkpoint with tokenizer files; skip MMLU

Rows: bf16 (the baseline), int8 (per channel), int4 g32 and g128 (input widths that 128 does not divide are
zero-padded, and the padding is counted), fp8 (DeepSeek's 128x128 blocks; no fused FP8 kernel on a CPU: its
forward reads the fp8 bytes by moving bits, dsv3.hub.e4m3_to_half_scaled, and runs a float32 matmul).
- bytes: the quantized layers (packed weights + scales) against the same layers in bf16, and the whole model
  (embedding, lm_head, router and norms stay bf16/fp32 in every row; the MTP layer counts too).
- perplexity: exp(mean NLL) over the first --tokens tokens of data/corpus/valid.txt, in --seq-len windows.
- MMLU: dsv3.eval.mmlu on the shipped validation subset (857 questions, or --mmlu-limit per subject; 0-shot,
  log-likelihood of " A".." D").
- speed, all variants in this one process taking turns (other processes on the machine hit them alike), median and
  min, and each as a ratio against bf16 (median of the paired ratios, and min against min): decode ms per step at
  batch 1, greedy, after a 64-token prompt, the variants taking turns at every step (`decode_steps`: --rounds
  rounds of --new-tokens steps); prefill tokens/s of a --prompt-tokens prompt (one forward, last logits; the
  variants take turns round by round, --rounds rounds, default 15).
- torchao rows (when `import torchao` works; `pip install -e ".[bench]"`): its int8 weight-only and int4 g32 weight-only
  (`IntxWeightOnlyConfig`: torchao 0.18's Int4WeightOnlyConfig has no CPU packing) on the same model, speed only.
  kv_b_proj stays bf16 there (absorbed MLA reads its weight as a matrix) and the MoE runs its per-expert loop.
- host overhead: one 1-row forward of a 64x64 layer (compute negligible) against nn.Linear's, as a ratio.
- rows crossover: kernel against dense path (dequantise once + one matmul) per row count, on the bundled model's
  two matrix shapes; DENSE_ABOVE_ROWS in dsv3/quant/int8.py, int4.py comes from the whole-model prefill.
- layer matvec: one linear at batch 1 (x [1, in]) in the shapes of DeepSeek-V3's big matrices, where reading the
  weight is the cost: a model as small as the bundled one is bound by per-op overhead on a CPU instead, so its
  decode row says little about what 4-bit weights do for a real checkpoint.
GPU figures (compiled and eager, batch 1 and 64, fp8 on sm90): bench/gpu_quant.sh.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dsv3
from dsv3.quant import quantize, quantized_layers
from dsv3.quant.base import QuantizedLinear

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


def torchao_variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """torchao's int8 and int4 (g32) weight-only on copies of `model`, or {} without torchao."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        return {}

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and name != "lm_head" and not name.endswith("kv_b_proj")
                and module.in_features % 32 == 0)

    out = {}
    for label, config in (("torchao int8", Int8WeightOnlyConfig()),
                          ("torchao int4 g32", IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                    granularity=PerGroup(32)))):
        quantize_(ao := copy.deepcopy(model), config, filter_fn=wanted)
        for module in ao.modules():
            if isinstance(module, dsv3.moe.MoE):
                module.path = "loop"  # its weights are tensor subclasses that cannot be stacked
        out[label] = ao
    return out


def paired_seconds(fns: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Each fn timed once per round, all taking turns, after one warm-up call each: {label: [seconds]}."""
    for fn in fns.values():
        fn()
    times = {label: [] for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return times


def summary(times: list[float], base: list[float]) -> dict[str, float]:
    """median, min, median of the per-round ratios to `base`, and min / min(base)."""
    return {"median": statistics.median(times), "min": min(times),
            "ratio_median": statistics.median(t / b for t, b in zip(times, base)), "ratio_min": min(times) / min(base)}


def decode_steps(models: dict[str, torch.nn.Module], prompt: torch.Tensor, steps: int,
                 rounds: int) -> dict[str, list[float]]:
    """{label: [ms per decode step]}: each round prefills every model into its own cache, then `steps` greedy steps
    (one new token through the cache, as generate's step) in which the models take turns, the order reversed at
    every step, each step timed alone in thread CPU time; the i-th entries of two lists are a pair. Whole
    generate calls taking turns round by round gave int4 anywhere from 0.88x to 1.07x of bf16 in runs minutes apart."""
    labels, T = list(models), prompt.shape[1]
    times = {label: [] for label in labels}
    for r in range(rounds):
        state = {}
        for label, model in models.items():
            cache = model.new_cache(1, T + steps)
            state[label] = cache, model(prompt, cache)[:, -1].argmax(-1), T
        for i in range(steps):
            for label in (labels if (r + i) % 2 == 0 else labels[::-1]):
                cache, token, pos = state[label]
                start = time.thread_time()
                token = models[label](token[:, None], cache, pos)[:, -1].argmax(-1)
                times[label].append((time.thread_time() - start) * 1e3)
                state[label] = cache, token, pos + 1
    return times


@torch.inference_mode()
def speed(models: dict[str, torch.nn.Module], prompt: torch.Tensor, long_prompt: torch.Tensor, new_tokens: int,
          rounds: int) -> dict[str, dict]:
    """{label: {"decode": summary of ms/step, "prefill": summary of seconds}} (see the module docstring)."""
    decode_steps(models, prompt, 2, 1)  # warm-up
    decode = decode_steps(models, prompt, new_tokens, rounds)
    prefill = paired_seconds({label: (lambda m=model: m(long_prompt, logits_to_keep=1)) for label, model in
                              models.items()}, rounds)
    return {label: {"decode": summary(decode[label], decode["bf16"]),
                    "prefill": summary(prefill[label], prefill["bf16"])} for label in models}


@torch.inference_mode()
def host_overhead(rounds: int = 2000) -> dict[str, float]:
    """µs of one 1-row forward of a 64x64 layer (bf16) — what the layer costs around its kernel — per scheme."""
    dense = torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16)
    layers = {"nn.Linear": dense}
    for label in ("int8", "int4 g32", "fp8"):
        scheme, kwargs = VARIANTS[label]
        layers[label] = quantize(torch.nn.Sequential(dense), scheme, skip=(), **kwargs)[0]
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    times = paired_seconds({label: (lambda layer=layer: [layer(x) for _ in range(100)]) for label, layer in
                            layers.items()}, rounds // 100)
    return {label: statistics.median(t) / 100 * 1e6 for label, t in times.items()}


@torch.inference_mode()
def crossover(shapes: dict[str, tuple[int, int]], rows=(1, 4, 16, 32, 64, 128, 256), rounds: int = 15) -> list[dict]:
    """Per shape, scheme and row count: µs of the kernel and of the dense path (median), bf16 activations."""
    out = []
    for shape, (out_dim, in_dim) in shapes.items():
        dense = torch.nn.Linear(in_dim, out_dim, bias=False, dtype=torch.bfloat16)
        for label in ("int8", "int4 g32"):
            scheme, kwargs = VARIANTS[label]
            layer: QuantizedLinear = quantize(torch.nn.Sequential(dense), scheme, skip=(), **kwargs)[0]
            for m in rows:
                x = torch.randn(m, in_dim, dtype=torch.bfloat16)
                t = paired_seconds({"kernel": lambda: layer.forward_kernel(x), "dense": lambda: layer.forward_dense(x),
                                    "bf16": lambda: dense(x)}, rounds)
                out.append({"shape": shape, "scheme": label, "rows": m,
                            **{k: statistics.median(v) * 1e6 for k, v in t.items()}})
    return out


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
    layers = list(quantized_layers(model).values())
    if not layers:
        return "dense" if not any(type(p).__module__.startswith("torchao") for p in model.parameters()) else "torchao"
    ready = [m.kernel_ready for m in layers]
    return "kernel" if all(ready) else "reference" if not any(ready) else "mixed"


def run(path: Path, labels: list[str], tokens: int, seq_len: int, args) -> list[dict]:
    tokenizer = dsv3.Tokenizer.from_pretrained(path)
    ids = torch.tensor(tokenizer.encode((REPO / "data/corpus/valid.txt").read_text(), add_special_tokens=False))
    prompt, long_prompt = ids[None, :64], ids[None, :args.prompt_tokens]
    ids = ids[:tokens + 1]
    rows, models = [], {}
    for label in labels:
        model = models[label] = load_variant(path, label)
        row = {"variant": label, "path": forward_path(model), **nbytes(model),
               "ppl": perplexity(model, ids, seq_len) if args.ppl else None}
        row["mmlu"] = mmlu_accuracy(model, tokenizer, args.mmlu_limit) if args.mmlu else None
        rows.append(row)
        print(f"  {label}: bytes{', perplexity' if args.ppl else ''}{', MMLU' if args.mmlu else ''} done", flush=True)
    for label, model in torchao_variants(models["bf16"]).items():
        models[label] = model
        rows.append({"variant": label, "path": "torchao", "layers": None, "ppl": None, "mmlu": None,
                     "model": sum(t.numel() * t.element_size() for t in model.state_dict().values())})
    for row, figures in zip(rows, speed(models, prompt, long_prompt, args.new_tokens, args.rounds).values()):
        row.update(figures)
    return rows


def table(rows: list[dict], rounds: int, tokens: int) -> str:
    base = next(r for r in rows if r["variant"] == "bf16")
    head = (f"{'variant':<17} {'forward':<9} {'layers MiB':>10} {'vs bf16':>8} {'ppl':>8} {'Δppl':>7} {'MMLU':>6} "
            f"{'decode ms/step med|min':>22} {'vs bf16 med|min':>16} {'prefill tok/s med|max':>22} "
            f"{'time vs bf16 med|min':>21}")
    lines = [f"speed: {rounds} rounds (decode: steps taking turns); ratios are times against bf16's (< 1: faster)",
             head, "-" * len(head)]
    for r in rows:
        layers = (f"{r['layers'] / 2**20:>10.2f} {r['layers'] / r['layers_bf16'] if r['layers_bf16'] else 1.0:>8.3f}"
                  if r["layers"] is not None else f"{'n/a':>10} {'':>8}")
        ppl = (f"{r['ppl']:>8.3f} {100 * (r['ppl'] / base['ppl'] - 1):>+6.2f}%" if r["ppl"] is not None
               and base["ppl"] is not None else f"{'n/a':>8} {'':>7}")
        mmlu = f"{100 * r['mmlu']:5.1f}%" if r["mmlu"] is not None else "   n/a"
        d, p = r["decode"], r["prefill"]
        lines.append(f"{r['variant']:<17} {r['path']:<9} {layers} {ppl} {mmlu} "
                     f"{d['median']:>10.2f} | {d['min']:>8.2f} {d['ratio_median']:>7.2f} | {d['ratio_min']:<6.2f} "
                     f"{tokens / p['median']:>10.0f} | {tokens / p['min']:>8.0f} "
                     f"{p['ratio_median']:>9.2f} | {p['ratio_min']:<6.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint dir with tokenizer files (default: the bundled model)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens for perplexity")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps per round")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompt length of the prefill timing")
    ap.add_argument("--rounds", type=int, default=15, help="paired timing rounds (median and min reported)")
    ap.add_argument("--no-ppl", dest="ppl", action="store_false")
    ap.add_argument("--no-mmlu", dest="mmlu", action="store_false")
    ap.add_argument("--mmlu-limit", type=int, default=None, help="questions per subject (default: all 857)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = args.model or dsv3.bundled_model_path()
    labels = ["bf16"] + [v for v in args.variants if v != "bf16"]
    rows = run(path, labels, args.tokens, args.seq_len, args)
    print(f"\n{path} | {args.tokens} held-out tokens, windows of {args.seq_len} | decode batch 1, "
          f"{args.new_tokens} steps a round after 64 | prefill {args.prompt_tokens} tokens | {args.threads} thread(s), "
          f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    print(table(rows, args.rounds, args.prompt_tokens))

    overhead = host_overhead()
    print("\nhost overhead: one 1-row forward of a 64x64 bf16 layer, µs (median), and against nn.Linear:")
    print("  " + "   ".join(f"{k} {v:.1f} ({v / overhead['nn.Linear']:.2f}x)" for k, v in overhead.items()))

    shapes = {"768x256 (dense MLP up)": (768, 256), "64x256 (routed expert up)": (64, 256)}
    cross = crossover(shapes)
    print("\nkernel vs dense path by rows, µs (median), bf16 activations; each cell kernel|dense|nn.Linear (bf16):")
    print(f"{'shape':<27} {'scheme':<9}" + "".join(f"{m:>18}" for m in sorted({c['rows'] for c in cross})))
    for (shape, scheme) in dict.fromkeys((c["shape"], c["scheme"]) for c in cross):
        cells = [c for c in cross if c["shape"] == shape and c["scheme"] == scheme]
        print(f"{shape:<27} {scheme:<9}" + "".join(f"{c['kernel']:>6.0f}|{c['dense']:>5.0f}|{c['bf16']:>5.0f}"
                                                    for c in cells))

    print("\nlayer matvec at batch 1, µs (median; x [1, in] bf16, kernels as above):")
    matvec = {name: matvec_us(*shape) for name, shape in MATVEC_SHAPES.items()}
    print(f"{'shape':<32}" + "".join(f"{k:>16}" for k in next(iter(matvec.values()))))
    for name, times in matvec.items():
        print(f"{name:<32}" + "".join(f"{t:>9.0f} ({times['bf16'] / t:.2f}x)" for t in times.values()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "host_overhead_us": overhead, "crossover_us": cross,
                                         "matvec_us": matvec}, indent=2) + "\n")


if __name__ == "__main__":
    main()
