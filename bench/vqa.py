"""Held-out synthetic VQA accuracy per question type: the VL model against two baselines that cannot see.

    python bench/vqa.py                          # the bundled VL model, 1000 held-out examples
    python bench/vqa.py --model DIR --n 200

The VL model answers through dsv3.generate(images=...) (greedy, stop at end of sentence), prompts built as the
server builds them (dsv3.vision.prompt.chat_ids), and an answer is right when the generated text equals the answer
word. Baselines: "text-only" answers each question type's most frequent training answer (the best any model without
the image can do: chance level), and "blank image" is the same VL model shown a grey image.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

import dsv3
from dsv3 import Tokenizer, generate
from dsv3.vision import data, load_vl
from dsv3.vision.prompt import chat_ids


def answers(model, tokenizer, examples: list[data.VQAExample], blank: bool = False, batch: int = 50) -> list[str]:
    """Greedy answers, batched over prompts of equal length (the templates give a few lengths)."""
    prompts = []
    for ex in examples:
        image = ex.image.point(lambda _: 127) if blank else ex.image
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": ex.question}]}]
        prompts.append(chat_ids(tokenizer, messages, model.vision_config))
    groups = defaultdict(list)
    for i, (ids, _) in enumerate(prompts):
        groups[len(ids)].append(i)
    out = [""] * len(examples)
    for members in groups.values():
        for start in range(0, len(members), batch):
            rows = members[start:start + batch]
            ids = torch.tensor([prompts[i][0] for i in rows])
            images = [prompts[i][1][0] for i in rows]
            tokens = generate(model, ids, 4, stop_token_ids=[tokenizer.eos_token_id], images=images,
                              pad_token_id=tokenizer.eos_token_id)
            for i, row in zip(rows, tokens[:, ids.shape[1]:].tolist()):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


def per_type(examples, predicted) -> dict[str, float]:
    return data.accuracy_by_type(examples, [p == ex.answer for ex, p in zip(examples, predicted)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="VL model directory (default: the bundled one)")
    parser.add_argument("--n", type=int, default=1000, help="held-out examples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="data seed the model was trained with (default 0)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.model or dsv3.bundled_model_path("vl")
    model = load_vl(path, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(path)
    size = model.vision_config.image_size
    examples = [data.example(i, "heldout", args.seed, size) for i in range(args.n)]
    start = time.time()
    vl = per_type(examples, answers(model, tokenizer, examples))
    seconds = time.time() - start
    blank = per_type(examples, answers(model, tokenizer, examples, blank=True))
    majority = data.majority_answers(5000, args.seed, size)
    text_only = per_type(examples, [majority[ex.qtype] for ex in examples])
    print(f"held-out synthetic VQA, {args.n} examples ({seconds:.1f} s for the VL pass, 1 thread)")
    print(f"{'type':<10}{'VL model':>10}{'text-only':>11}{'blank image':>13}")
    for t in (*data.TYPES, "overall"):
        print(f"{t:<10}{vl[t]:>10.3f}{text_only[t]:>11.3f}{blank[t]:>13.3f}")
    print(f"VL / text-only (overall): {vl['overall'] / text_only['overall']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "vl": vl, "text_only": text_only, "blank_image": blank}, f, indent=1)


if __name__ == "__main__":
    main()
