"""MTP speculative decoding on the bundled model: draft acceptance and speed-up over plain greedy `dsv3.generate`.

    python bench/speculative.py [--model DIR] [--new-tokens 64] [--repeat 5]

Timed on text prompts (random ids give the MTP head nothing to predict), one thread, median of --repeat runs; the
tokens are compared with plain greedy decoding. The comparison with transformers is bench/forward.py.
"""

from __future__ import annotations

import argparse
import platform

import torch

import dsv3
from dsv3.speculative import speculative_generate
from forward import median_times  # bench/ is on sys.path when run as `python bench/speculative.py`

TEXTS = ["The history of the city begins", "Once upon a time there was a", "In mathematics, a group is",
         "The river flows through the valley and"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    path = args.model or dsv3.bundled_model_path()
    model = dsv3.load_pretrained(path, dtype=torch.float32)
    tok = dsv3.Tokenizer.from_pretrained(path)
    n, r = args.new_tokens, args.repeat
    same, drafted, accepted, t_plain, t_spec = True, 0, 0, 0.0, 0.0
    with torch.inference_mode():
        for text in TEXTS:
            ids = torch.tensor([tok.encode(text)])
            out, stats = speculative_generate(model, ids, n, return_stats=True)
            same &= torch.equal(out, dsv3.generate(model, ids, n))
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
            times = median_times({"plain": lambda: dsv3.generate(model, ids, n),
                                  "speculative": lambda: speculative_generate(model, ids, n)}, r)
            t_plain, t_spec = t_plain + times["plain"], t_spec + times["speculative"]
    print(f"model {path}: {model.num_parameters() / 1e6:.2f}M parameters, float32, 1 thread, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, median of {r}")
    print(f"MTP draft, {len(TEXTS)} text prompts x {n} tokens: acceptance {accepted}/{drafted} = "
          f"{accepted / max(drafted, 1):.1%}, same tokens as generate: {same}, "
          f"speed-up over dsv3.generate {t_plain / t_spec:.2f}x")


if __name__ == "__main__":
    main()
