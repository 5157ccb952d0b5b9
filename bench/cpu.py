"""CPU figures of issue 9 on the bundled model: dsv3 vs transformers (prefill, batch-1 greedy decode) and MTP
speculative decoding (acceptance, speed-up over plain greedy), one thread each, median of several repeats.

    python bench/cpu.py [--model DIR] [--prompt-len 256] [--new-tokens 64] [--repeat 5]

Decode ms/token = (t(N) - t(1)) / (N - 1) of each library's `generate`, so prefill is not counted. transformers
runs with EOS stopping switched off (`generation_config.eos_token_id = None`; `min_new_tokens` would instead
*suppress* EOS and change the greedy tokens), and the tokens of both are compared. Speculative decoding is timed
on text prompts (random ids give the MTP head nothing to predict) against `dsv3.generate` on the same prompts.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import dsv3
from dsv3.speculative import speculative_generate

TEXTS = ["The history of the city begins", "Once upon a time there was a", "In mathematics, a group is",
         "The river flows through the valley and"]


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
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
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    path = args.model or dsv3.bundled_model_path()
    ours = dsv3.load_pretrained(path, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None
    n, r = args.new_tokens, args.repeat
    prompt = torch.randint(3, ours.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    def hf(x, k):
        return theirs.generate(x, max_new_tokens=k, do_sample=False, pad_token_id=ours.config.eos_token_id)

    with torch.inference_mode():
        pre = [median_time(lambda: ours(prompt), r), median_time(lambda: theirs(prompt).logits, r)]
        same = torch.equal(dsv3.generate(ours, prompt, n), hf(prompt, n))
        dec = [(median_time(lambda: g(prompt, n), r) - median_time(lambda: g(prompt, 1), r)) / (n - 1)
               for g in (lambda x, k: dsv3.generate(ours, x, k), hf)]
        tok = dsv3.Tokenizer.from_pretrained(path)
        spec_same, drafted, accepted, t_plain, t_spec = True, 0, 0, 0.0, 0.0
        for text in TEXTS:
            ids = torch.tensor([tok.encode(text)])
            out, stats = speculative_generate(ours, ids, n, return_stats=True)
            spec_same &= torch.equal(out, dsv3.generate(ours, ids, n))
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
            t_plain += median_time(lambda: dsv3.generate(ours, ids, n), r)
            t_spec += median_time(lambda: speculative_generate(ours, ids, n), r)
    print(f"model {path}: {ours.num_parameters() / 1e6:.2f}M parameters, float32, 1 thread, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, median of {r}")
    print(f"same greedy tokens as transformers ({n} new): {same}")
    print(f"{'':24}{'dsv3':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'prefill tokens/s':24}{args.prompt_len / pre[0]:12.0f}{args.prompt_len / pre[1]:14.0f}"
          f"{pre[1] / pre[0]:7.2f}x")
    print(f"{'decode ms/token':24}{dec[0] * 1e3:12.2f}{dec[1] * 1e3:14.2f}{dec[1] / dec[0]:7.2f}x")
    print(f"speculative (MTP draft, {len(TEXTS)} text prompts x {n} tokens): acceptance {accepted}/{drafted} = "
          f"{accepted / max(drafted, 1):.1%}, same tokens as generate: {spec_same}, "
          f"speed-up over dsv3.generate {t_plain / t_spec:.2f}x")


if __name__ == "__main__":
    main()
