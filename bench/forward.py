"""Prefill tokens/s and decode ms/token: dsv3 against transformers on the same checkpoint, same machine, one run.

    python bench/forward.py [--model DIR] [--prompt-len 256] [--new-tokens 64] [--threads N]

Without --model it uses the bundled model. Both run in float32 on CPU (bf16 matmuls are slow on most CPUs);
the greedy tokens of both are compared, so a speed-up never hides a different answer.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import dsv3


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = args.model or dsv3.bundled_model_path()
    ours = dsv3.load_pretrained(path, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = ours.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        t_ours, logits_ours = timed(lambda: ours(prompt), args.repeat)
        t_hf, logits_hf = timed(lambda: theirs(prompt).logits, args.repeat)
        err = ((logits_ours - logits_hf).norm() / logits_hf.norm()).item()
        n = args.new_tokens
        g_ours, out_ours = timed(lambda: dsv3.generate(ours, prompt, n), 1)
        # neither side stops at eos (min_new_tokens would instead suppress eos in transformers and change tokens)
        theirs.generation_config.eos_token_id = None
        g_hf, out_hf = timed(lambda: theirs.generate(prompt, max_new_tokens=n, do_sample=False,
                                                     pad_token_id=ours.config.eos_token_id), 1)
    same = torch.equal(out_ours, out_hf)
    # decode time per token: generate's time minus one prefill, over the new tokens
    d_ours, d_hf = (g_ours - t_ours) / (n - 1), (g_hf - t_hf) / (n - 1)
    print(f"model {path}: {ours.num_parameters() / 1e6:.2f}M parameters, float32, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"logits relative error vs transformers: {err:.2e}; same greedy tokens: {same}")
    print(f"{'':24}{'dsv3':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'prefill tokens/s':24}{args.prompt_len / t_ours:12.0f}{args.prompt_len / t_hf:14.0f}"
          f"{t_hf / t_ours:7.2f}x")
    print(f"{'decode ms/token':24}{d_ours * 1e3:12.2f}{d_hf * 1e3:14.2f}{d_hf / d_ours:7.2f}x")


if __name__ == "__main__":
    main()
