"""Prefill tokens/s and decode ms/token: dsv3 against transformers on the same checkpoint, same machine, one run.

    python bench/forward.py [--model DIR] [--prompt-len 256] [--new-tokens 64] [--repeat 5] [--threads 1]

Without --model it uses the bundled model. Both run in float32 on CPU (bf16 matmuls are slow on most CPUs), with the
same thread count, timed as the median of --repeat runs. Decode ms/token = (t(N) - t(1)) / (N - 1) of each library's
`generate`, so prefill is not counted. transformers runs with EOS stopping switched off
(`generation_config.eos_token_id = None`; `min_new_tokens` would instead *suppress* EOS and change the greedy
tokens), and the greedy tokens of both are compared, so a speed-up never hides a different answer.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import dsv3


def median_time(fn, repeat: int) -> float:
    """Median wall time of fn() over `repeat` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
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

    with torch.inference_mode():
        reference = theirs(prompt).logits
        err = ((ours(prompt) - reference).norm() / reference.norm()).item()
        same = torch.equal(dsv3.generate(ours, prompt, n), hf(prompt, n))
        pre = [median_time(lambda: ours(prompt), r), median_time(lambda: theirs(prompt).logits, r)]
        dec = [(median_time(lambda: g(prompt, n), r) - median_time(lambda: g(prompt, 1), r)) / (n - 1)
               for g in (lambda x, k: dsv3.generate(ours, x, k), hf)]
    print(f"model {path}: {ours.num_parameters() / 1e6:.2f}M parameters, float32, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, median of {r}")
    print(f"logits relative error vs transformers: {err:.2e}; same greedy tokens ({n} new): {same}")
    print(f"{'':24}{'dsv3':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'prefill tokens/s':24}{args.prompt_len / pre[0]:12.0f}{args.prompt_len / pre[1]:14.0f}"
          f"{pre[1] / pre[0]:7.2f}x")
    print(f"{'decode ms/token':24}{dec[0] * 1e3:12.2f}{dec[1] * 1e3:14.2f}{dec[1] / dec[0]:7.2f}x")


if __name__ == "__main__":
    main()
