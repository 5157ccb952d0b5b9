"""Write data/lora/reply_format.jsonl: chat examples that teach the bundled model a fixed reply format.

The bundled model was pre-trained on WordNet gloss lines ("word (noun): definition; \"example\"",
data/corpus/train.txt). Each example here asks "Define: <word>" and the assistant answers
"Definition of <word> (<part of speech>): <gloss>." — a format the corpus never uses, so whether the adapter
learnt it is visible in a single generation. Seeded: the same corpus gives the same file.

    python scripts/make_lora_data.py [--n 400] [--seed 0]
"""

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(?P<words>[^()]+?) \((?P<pos>noun|verb|adjective|adverb)\): (?P<rest>.+)$")


def candidates(corpus: Path) -> list[dict]:
    """One entry per corpus line whose first headword is a short lowercase word and whose gloss is short."""
    out, seen = [], set()
    for line in corpus.read_text(encoding="utf-8").splitlines():
        m = LINE.match(line)
        if not m:
            continue
        word = m.group("words").split(",")[0].strip()
        gloss = m.group("rest").split('; "')[0].strip().rstrip(";")
        if not re.fullmatch(r"[a-z]{3,14}", word) or word in seen or not 10 <= len(gloss) <= 90:
            continue
        seen.add(word)
        out.append({"word": word, "pos": m.group("pos"), "gloss": gloss})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, default=ROOT / "data/corpus/train.txt")
    parser.add_argument("--out", type=Path, default=ROOT / "data/lora/reply_format.jsonl")
    args = parser.parse_args()
    pool = candidates(args.corpus)
    chosen = random.Random(args.seed).sample(pool, args.n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for c in chosen:
            messages = [{"role": "user", "content": f"Define: {c['word']}"},
                        {"role": "assistant", "content": f"Definition of {c['word']} ({c['pos']}): {c['gloss']}."}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    print(f"{args.out}: {len(chosen)} examples from {len(pool)} candidate lines")


if __name__ == "__main__":
    main()
