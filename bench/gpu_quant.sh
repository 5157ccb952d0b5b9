#!/usr/bin/env bash
# Issue 20's GPU targets for quantized weights, in one run of under 3 minutes on an H200 (bench/decode.py's
# DeepSeek-V2-Lite-shaped random model: hidden 2048, 12 layers, 64 routed experts top-6 + 2 shared of width 1408,
# first layer dense, ~6.9B parameters, ~14 GB in bf16):
#
#   bash bench/gpu_quant.sh                  # CUDA
#   bash bench/gpu_quant.sh --dry-run        # CPU, bench/decode.py's tiny model, compiled rows skipped (seconds)
#   bash bench/gpu_quant.sh --dry-run --budget 600   # ... with the compiled rows too (minutes on a CPU)
#
# Variants: bf16, int4 g128 (the dense layer's 10944 is zero-padded to 11008), int8, fp8 (sm90; on other devices
# its reference path). All are built from one seeded bf16 model and held at once; timings take turns, round by
# round, and every figure is printed with its ratio to bf16 measured in the same run (speed-up = bf16 time /
# variant time, so > 1 is faster). Per row: the warm-up (eager: first generate; compiled: torch.compile) seconds.
# - decode batch 1 eager, ms/token = (t(N) - t(1)) / (N - 1), median of --rounds: target within 15% of bf16
#   (speed-up >= 0.87).
# - decode batch 64 eager, tokens/s: target not slower than bf16 (speed-up >= 1).
# - decode batch 1 compiled (generate(compile=True): CUDA graphs), after a check that its greedy tokens equal
#   eager's: targets int4 g128 >= 1.6x, int8 >= 1.3x, fp8 >= 1.3x compiled bf16. A compile starts only when the
#   run, plus the longest compile so far, stays inside --budget seconds (default 150 on a GPU, 0 for --dry-run);
#   the eager rows are printed before. Each model's compiled rounds run in a row (CUDA-graph trees).
# - one layer's matvec (x [1, 2048] through expert 0's gate_proj and the attention o_proj), µs: the kernel alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS="$*" python - <<'PY'
import argparse, copy, os, shlex, statistics, sys, time

import torch

sys.path.insert(0, "bench")
import dsv3
from decode import TINY, V2_LITE, distinct_rows, timer
from dsv3.quant import quantize, quantized_layers

ap = argparse.ArgumentParser(prog="bench/gpu_quant.sh")
ap.add_argument("--dry-run", action="store_true")
ap.add_argument("--budget", type=float, help="seconds within which every compile should end")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--new-tokens", type=int, default=32)
args = ap.parse_args(shlex.split(os.environ["ARGS"]))
start_all = time.perf_counter()
if args.dry_run:
    device, shape, args.new_tokens, batch, budget = torch.device("cpu"), TINY, 6, 8, 0
    torch.set_num_threads(1)
else:
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_quant.sh needs a CUDA GPU (or --dry-run)")
    device, shape, batch, budget = torch.device("cuda"), V2_LITE, 64, 150
budget = budget if args.budget is None else args.budget
sm90 = device.type == "cuda" and torch.cuda.get_device_capability() == (9, 0)
VARIANTS = {"bf16": None, "int4 g128": ("int4", {"group_size": 128, "pad": True}), "int8": ("int8", {}),
            "fp8": ("fp8", {})}  # compiled in this order while the budget lasts: the headline target first
TARGET_COMPILED = {"int8": 1.3, "int4 g128": 1.6, "fp8": 1.3}
run = timer(device)
config = dsv3.ModelConfig(**shape)
torch.manual_seed(0)
with torch.device(device):
    base = dsv3.Transformer(config)
base = base.to(torch.bfloat16).eval()
card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
print(f"{card} | torch {torch.__version__} | {base.num_parameters() / 1e9:.2f}B parameters, bf16 | "
      f"fp8 kernel: {'yes' if sm90 else 'no (reference path)'}", flush=True)

models, setup = {}, {}
for label, spec in VARIANTS.items():
    t0 = time.perf_counter()
    models[label] = base if spec is None else quantize(copy.deepcopy(base), spec[0], **spec[1])
    setup[label] = time.perf_counter() - t0
gib = {label: sum(t.numel() * t.element_size() for t in m.state_dict().values()) / 2**30 for label, m in models.items()}
gen = torch.Generator(device).manual_seed(0)
prompt = torch.randint(0, config.vocab_size, (1, 32), device=device, generator=gen)
wide = distinct_rows(prompt, batch)


def path(model):
    layers = list(quantized_layers(model).values())
    return "dense" if not layers else "kernel" if all(m.kernel_ready for m in layers) else (
        "reference" if not any(m.kernel_ready for m in layers) else "mixed")


def per_step(prompts, compile=False):
    """Seconds per decode step of every model, median of the rounds. Eager: the models take turns round by round.
    Compiled: each model's rounds in a row after a warm-up (CUDA-graph trees re-record when the graph changes)."""
    n, times = args.new_tokens, {label: [] for label in models if label not in skipped}

    def one(label):
        model = models[label]
        t1 = run(lambda: dsv3.generate(model, prompts, 1, compile=compile))
        times[label].append((run(lambda: dsv3.generate(model, prompts, n, compile=compile)) - t1) / (n - 1))

    order = ([label for _ in range(args.rounds) for label in times] if not compile else
             [label for label in times for _ in range(args.rounds + 1)])
    for label in order:
        if label not in skipped:
            guarded(label, lambda: one(label))
    return {label: statistics.median(t[1:] if compile else t) for label, t in times.items() if label not in skipped}


def matvec_us(layer, in_dim):
    x = torch.randn(1, in_dim, dtype=torch.bfloat16, device=device)
    for _ in range(5):
        layer(x)
    return run(lambda: [layer(x) for _ in range(100)]) / 100 * 1e6


def guarded(label, fn):
    """fn() or, if it raises, None with the error on one line and the variant left out of what follows."""
    try:
        return fn()
    except Exception as e:  # a failing variant must not cost the other rows of a one-off GPU run
        print(f"  {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        skipped.add(label)


skipped = set()
warm = {label: guarded(label, lambda: run(lambda: dsv3.generate(m, prompt, 4)))  # int4 kv_b_proj unpacks here
        for label, m in models.items()}
for label in skipped:
    del models[label]
eager_1 = per_step(prompt)
eager_b = per_step(wide)
mv = {label: (matvec_us(m.model.layers[1].mlp.experts[0].gate_proj, config.hidden_size),
              matvec_us(m.model.layers[1].self_attn.o_proj, config.num_attention_heads * config.v_head_dim))
      for label, m in models.items() if label not in skipped}

print(f"\n{'variant':<10} {'forward':<9} {'setup s':>7} {'weights GiB':>11} {'vs bf16':>7} {'warm-up s':>9} "
      f"{'eager b1 ms/tok':>15} {'speed-up':>8} {'≥0.87':>5} {f'eager b{batch} tok/s':>16} {'speed-up':>8} "
      f"{'≥1':>3} {'gate µs':>8} {'speed-up':>8} {'o_proj µs':>9} {'speed-up':>8}")
for label in mv:
    s1, sb = eager_1["bf16"] / eager_1[label], eager_b["bf16"] / eager_b[label]
    print(f"{label:<10} {path(models[label]):<9} {setup[label]:>7.1f} {gib[label]:>11.2f} "
          f"{gib[label] / gib['bf16']:>7.3f} {warm[label]:>9.1f} {eager_1[label] * 1e3:>15.2f} {s1:>7.2f}x "
          f"{'yes' if s1 >= 1 / 1.15 else 'NO':>5} {batch / eager_b[label]:>16.0f} {sb:>7.2f}x "
          f"{'yes' if sb >= 1 else 'NO':>3} {mv[label][0]:>8.1f} {mv['bf16'][0] / mv[label][0]:>7.2f}x "
          f"{mv[label][1]:>9.1f} {mv['bf16'][1] / mv[label][1]:>7.2f}x", flush=True)

if "int8" in mv:  # the int8 forms on this card: the layer's (cast-matmul on CUDA) and aten's int8 matvec op
    layer = models["int8"].model.layers[1].mlp.experts[0].gate_proj
    x1 = torch.randn(1, config.hidden_size, dtype=torch.bfloat16, device=device)
    try:
        op = run(lambda: [torch._weight_int8pack_mm(x1, layer.weight, layer.scale) for _ in range(100)]) / 100 * 1e6
        op = f"{op:.1f} µs"
    except (RuntimeError, NotImplementedError) as error:
        op = f"unavailable ({str(error).splitlines()[0]})"
    print(f"int8 gate_proj matvec: the layer {mv['int8'][0]:.1f} µs, aten._weight_int8pack_mm {op}, "
          f"bf16 {mv['bf16'][0]:.1f} µs", flush=True)

print(f"\ncompiled decode, batch 1 (a compile starts if it should end within {budget:.0f} s of the start):",
      flush=True)
compile_s, same = {}, {}
for label, model in models.items():
    elapsed = time.perf_counter() - start_all  # start only what should end within the budget
    if elapsed + max(compile_s.values(), default=0) > budget or (label != "bf16" and "bf16" not in compile_s):
        print(f"  {label}: skipped ({elapsed:.0f} s elapsed)", flush=True)
        skipped.add(label)
        continue
    eager = dsv3.generate(model, prompt, 8)
    t0 = time.perf_counter()
    tokens = guarded(label, lambda: dsv3.generate(model, prompt, 8, compile=True))
    if tokens is None:
        continue
    compile_s[label], same[label] = time.perf_counter() - t0, torch.equal(tokens, eager)
    print(f"  {label}: compile + first run {compile_s[label]:.1f} s, greedy tokens equal eager's: {same[label]}",
          flush=True)
if compile_s:
    compiled = per_step(prompt, compile=True)
    print(f"{'variant':<10} {'compile s':>9} {'same tokens':>11} {'ms/token':>9} {'vs compiled bf16':>16} "
          f"{'target':>7} {'vs eager bf16':>13}")
    for label, t in compiled.items():
        target = TARGET_COMPILED.get(label)
        speedup = compiled["bf16"] / t
        verdict = "" if target is None else f"{'yes' if speedup >= target else 'NO'} ≥{target}"
        print(f"{label:<10} {compile_s[label]:>9.1f} {str(same[label]):>11} {t * 1e3:>9.2f} {speedup:>15.2f}x "
              f"{verdict:>7} {eager_1['bf16'] / t:>12.2f}x")
print(f"\ntotal {time.perf_counter() - start_all:.0f} s")
PY
