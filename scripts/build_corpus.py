"""Build the bundled model's training corpus from WordNet 3.0 (Debian package ``wordnet-base``).

Why WordNet: it installs offline by package name (``apt-get install wordnet-base``), it is real, carefully
edited English, and its licence lets anyone use, copy, modify and distribute the database and works derived
from it (a model trained on it included) as long as the Princeton copyright notice travels along — see
``data/corpus/SOURCE.md``.

Each synset becomes one line, its lemmas, part of speech and gloss (definition plus example sentences)::

    dog, domestic dog, Canis familiaris (noun): a member of the genus Canis ...; "the dog barked all night"

The lines are shuffled with a fixed seed and split into ``train.txt`` and ``valid.txt``, so the held-out
split is an i.i.d. sample of synsets and the build is byte-for-byte reproducible.

Source for the file layout: the ``wndb(5)`` manual page of WordNet 3.0 ("data.pos" lines are
``synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt [ptr...] [frames...] | gloss``,
with ``w_cnt`` in hexadecimal, lemmas written with ``_`` for spaces and adjectives optionally carrying a
syntactic marker such as ``(p)``).

Usage::

    python scripts/build_corpus.py [--wordnet-dir /usr/share/wordnet] [--out data/corpus]
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

POS_FILES = ("noun", "verb", "adj", "adv")
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def parse_synset(line: str, where: str) -> str:
    """Turn one ``data.pos`` line into ``"lemma, lemma (pos): gloss"``; ``where`` names file:line in errors."""
    head, sep, gloss = line.partition(" | ")
    if not sep:
        raise ValueError(f"{where}: no ' | ' gloss separator in synset line")
    fields = head.split()
    if len(fields) < 6:
        raise ValueError(f"{where}: synset line has {len(fields)} fields before the gloss, expected at least 6")
    ss_type = fields[2]
    if ss_type not in POS_NAMES:
        raise ValueError(f"{where}: unknown ss_type {ss_type!r}, expected one of {sorted(POS_NAMES)}")
    try:
        w_cnt = int(fields[3], 16)
    except ValueError:
        raise ValueError(f"{where}: w_cnt {fields[3]!r} is not a hexadecimal number") from None
    words = fields[4 : 4 + 2 * w_cnt : 2]
    if len(words) != w_cnt:
        raise ValueError(f"{where}: w_cnt says {w_cnt} lemmas but the line holds {len(words)}")
    lemmas = [ADJECTIVE_MARKER.sub("", w).replace("_", " ") for w in words]
    # WordNet quotes with TeX-style `...'; plain apostrophes read better in generated text.
    gloss = " ".join(gloss.split()).replace("`", "'")
    if not gloss:
        raise ValueError(f"{where}: empty gloss")
    return f"{', '.join(lemmas)} ({POS_NAMES[ss_type]}): {gloss}"


def read_wordnet(wordnet_dir: Path) -> list[str]:
    """All synsets of the four ``data.*`` files, in file order."""
    lines = []
    for pos in POS_FILES:
        path = wordnet_dir / f"data.{pos}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; install WordNet with `apt-get install wordnet-base`")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("  "):  # the licence header at the top of every data file
                    continue
                lines.append(parse_synset(line, f"{path}:{lineno}"))
    return lines


def split(lines: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle, then the first ``valid_fraction`` of lines is the held-out split."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    shuffled = list(lines)
    random.Random(seed).shuffle(shuffled)
    n_valid = max(1, round(len(shuffled) * valid_fraction))
    return shuffled[n_valid:], shuffled[:n_valid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "corpus")
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train, valid = split(read_wordnet(args.wordnet_dir), args.valid_fraction, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.txt", train), ("valid.txt", valid)):
        text = "".join(line + "\n" for line in part)
        (args.out / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"{args.out / name}: {len(part)} lines, {len(text)} characters")


if __name__ == "__main__":
    main()
