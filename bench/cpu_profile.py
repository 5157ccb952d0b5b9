"""Where an eager CPU decode step's time goes: per module and per aten op, on one thread.

    python bench/cpu_profile.py [--model DIR] [--prompt-len 256] [--steps 64] [--dtype float32]

Prefills a --prompt-len prompt, then times --steps greedy decode steps (`dsv3.generation._step`, what
`dsv3.generate` runs without compile=True) three ways:
- the whole step in thread CPU time, with nothing attached (the reference figure);
- per module class (MLA, MoE, Gate, MLP, RMSNorm, Linear, ...) by forward hooks: inclusive thread time per step
  and calls per step. Hooks add a few microseconds per call, so the shares are the figure to read;
- per aten op by torch.profiler: the top-level ops (those not called by another aten op) per step, which is what
  the dispatcher pays for, and the profiler's own time per op (inflated by the profiler, again: read the shares).
"""

from __future__ import annotations

import argparse
import collections
import platform
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dsv3
from dsv3.generation import _prefill, _step


def decode(model, tokens, cache, start: int, steps: int) -> torch.Tensor:
    for i in range(steps):
        tokens = _step(model, tokens, cache, start + i).argmax(-1)
    return tokens


def module_times(model, tokens, cache, start: int, steps: int) -> dict[str, tuple[float, float]]:
    """{module class: (inclusive thread seconds per step, calls per step)} by forward hooks."""
    spent, calls, began = collections.Counter(), collections.Counter(), {}

    def pre(mod, args):
        began[id(mod)] = time.thread_time()

    def post(mod, args, out):
        name = type(mod).__name__
        spent[name] += time.thread_time() - began.pop(id(mod))
        calls[name] += 1

    handles = [h for mod in model.modules() if mod is not model
               for h in (mod.register_forward_pre_hook(pre), mod.register_forward_hook(post))]
    try:
        decode(model, tokens, cache, start, steps)
    finally:
        for h in handles:
            h.remove()
    return {name: (spent[name] / steps, calls[name] / steps) for name in spent}


def op_counts(model, tokens, cache, start: int, steps: int) -> dict[str, tuple[float, float]]:
    """{aten op: (top-level calls per step, profiler self+children seconds per step)}."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(model, tokens, cache, start, steps)
    calls, spent = collections.Counter(), collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            calls[e.name] += 1
            spent[e.name] += e.cpu_time_total * 1e-6
    return {name: (calls[name] / steps, spent[name] / steps) for name in calls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--top", type=int, default=15, help="how many aten ops to list")
    args = p.parse_args()
    torch.set_num_threads(1)
    path = args.model or dsv3.bundled_model_path()
    model = dsv3.fast.arrange(dsv3.load_pretrained(path, dtype=getattr(torch, args.dtype)))  # as generate does
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    n = args.steps
    with torch.inference_mode():
        cache = model.new_cache(1, args.prompt_len + 3 * n + 8)
        tokens = _prefill(model, prompt, cache).argmax(-1)
        tokens = decode(model, tokens, cache, args.prompt_len, 8)  # warm-up
        start = args.prompt_len + 8
        began = time.thread_time()
        decode(model, tokens, cache, start, n)
        step = (time.thread_time() - began) / n
        modules = module_times(model, tokens, cache, start, n)
        ops = op_counts(model, tokens, cache, start, n)
    print(f"model {path}, {args.dtype}, 1 thread, {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}; decode step after a {args.prompt_len}-token prompt: {step * 1e3:.2f} ms "
          f"(thread CPU time, mean of {n})")
    hooked = sum(t for name, (t, _) in modules.items() if name == "Block") or step
    print(f"\n{'module (inclusive)':22}{'ms/step':>9}{'share of blocks':>17}{'calls/step':>12}")
    for name, (t, c) in sorted(modules.items(), key=lambda kv: -kv[1][0]):
        print(f"{name:22}{t * 1e3:9.3f}{t / hooked:16.0%}{c:12.0f}")
    total_calls, total_time = sum(c for c, _ in ops.values()), sum(t for _, t in ops.values())
    print(f"\ntop-level aten ops per step: {total_calls:.0f} (profiled time {total_time * 1e3:.2f} ms/step)")
    print(f"{'aten op':34}{'calls/step':>11}{'share of profiled time':>24}")
    for name, (c, t) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{name:34}{c:11.0f}{t / total_time:23.0%}")


if __name__ == "__main__":
    main()
