"""Prefill and decode speed: dsv3.generate against transformers' generate on the same checkpoint, same machine, one run.

    python bench/forward.py [--model DIR] [--prompt-len 256] [--new-tokens 64] [--repeat 9] [--threads 1] [--compile]

Without --model it uses the bundled model. Both run in float32 on CPU (bf16 matmuls are slow on most CPUs), with the
same thread count, timed over --repeat runs taking turns; the table gives the median and the best (min) run: on a
shared machine the median moves with the neighbours' load, the min is each library's uncontended speed.
Prefill = the time of each library's generate for one new token (time to first token: both compute the head for
the last position only). Decode ms/token =
(t(N) - t(1)) / (N - 1) of each library's generate, so prefill is not counted. --compile adds dsv3's
`generate(..., compile=True)` (the prefill and the decode step through torch.compile; their one-off compile time
is printed, not counted). transformers runs with EOS stopping switched off (`generation_config.eos_token_id = None`;
`min_new_tokens` would instead *suppress* EOS and change the greedy tokens), and the greedy tokens of every variant
are compared, so a speed-up never hides a different answer.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import dsv3


def turn_times(fns: dict, repeat: int) -> dict[str, list[float]]:
    """Wall times of each fn() over `repeat` rounds, after one warm-up round. The fns take turns within a round,
    so a change in machine load hits all of them alike."""
    times = {name: [] for name in fns}
    for round_ in range(repeat + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def median_times(fns: dict, repeat: int) -> dict:
    """Median wall time of each fn() (`turn_times`)."""
    return {name: statistics.median(t) for name, t in turn_times(fns, repeat).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time generate(..., compile=True)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = args.model or dsv3.bundled_model_path()
    ours = dsv3.load_pretrained(path, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None
    n, r = args.new_tokens, args.repeat
    prompt = torch.randint(3, ours.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    def hf(x, k):
        return theirs.generate(x, max_new_tokens=k, do_sample=False, pad_token_id=ours.config.eos_token_id)

    variants = {"dsv3": lambda x, k: dsv3.generate(ours, x, k), "transformers": hf}
    compile_s = None
    with torch.inference_mode():
        reference = theirs(prompt).logits
        err = ((ours(prompt) - reference).norm() / reference.norm()).item()
        if args.compile:
            start = time.perf_counter()
            dsv3.generate(ours, prompt, 2, compile=True)  # compiles the prefill and the decode step once
            compile_s = time.perf_counter() - start
            variants["dsv3 compile=True"] = lambda x, k: dsv3.generate(ours, x, k, compile=True)
        expected = hf(prompt, n)
        same = {name: torch.equal(g(prompt, n), expected) for name, g in variants.items()}
        first_runs = turn_times({name: lambda g=g: g(prompt, 1) for name, g in variants.items()}, r)
        full_runs = turn_times({name: lambda g=g: g(prompt, n) for name, g in variants.items()}, r)
    rows = {}
    for stat in (statistics.median, min):
        first = {name: stat(t) for name, t in first_runs.items()}
        full = {name: stat(t) for name, t in full_runs.items()}
        rows[stat.__name__] = first, {name: (full[name] - first[name]) / (n - 1) for name in variants}
    print(f"model {path}: {ours.num_parameters() / 1e6:.2f}M parameters, float32, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {r} runs each")
    print(f"logits relative error vs transformers: {err:.2e}; same greedy tokens as transformers ({n} new): {same}")
    if compile_s is not None:
        print(f"torch.compile of the prefill and the decode step: {compile_s:.0f} s (once per process)")
    print(f"{'':22}{'prefill tokens/s':>17}{'vs transformers':>16}{'decode ms/token':>17}{'vs transformers':>16}")
    for stat, (first, decode) in rows.items():
        print(f"{stat} of {r} runs:")
        for name in variants:
            print(f"  {name:20}{args.prompt_len / first[name]:17.0f}{first['transformers'] / first[name]:15.2f}x"
                  f"{decode[name] * 1e3:17.2f}{decode['transformers'] / decode[name]:15.2f}x")


if __name__ == "__main__":
    main()
