"""Train the bundled model's byte-level BPE tokenizer and write it in DeepSeek-V3's checkpoint layout.

The result is two files, read by :class:`dsv3.tokenizer.Tokenizer` and by ``transformers.AutoTokenizer`` alike:

* ``tokenizer.json`` — a ``tokenizers`` pipeline: no normalizer; numbers split into runs of at most three digits
  (as DeepSeek-V3's pre-tokenizer does, so that no token spans a long number); GPT-2's byte-level pre-tokenizer
  and decoder, so every string round-trips without an unknown token; BPE merges learned on the corpus; and a
  post-processor that prepends the bos token.
* ``tokenizer_config.json`` — the fields DeepSeek-V3's checkpoint ships (``add_bos_token``, ``bos_token`` as an
  ``AddedToken`` dict, ``tokenizer_class: LlamaTokenizerFast``, ``chat_template``, …). transformers 5 notices
  that a "LlamaTokenizerFast" is byte-level and loads it as a generic ``TokenizersBackend``, exactly as it does
  for the real DeepSeek-V3.

The special tokens are DeepSeek-V3's own strings (fullwidth bars U+FF5C, lower-eighth block U+2581) at the
ids it gives the first three: bos 0, eos 1, pad 2; then the two chat-role markers.

Sources: DeepSeek-V3's ``tokenizer_config.json`` and ``tokenizer.json`` on the Hugging Face Hub
(deepseek-ai/DeepSeek-V3); the ``tokenizers`` documentation for ``BpeTrainer`` and ``TemplateProcessing``.

Usage (after ``scripts/build_corpus.py``)::

    python scripts/train_tokenizer.py [--corpus data/corpus/train.txt] [--out dsv3/bundled] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# The trainer is multi-threaded through rayon; one thread keeps it a polite neighbour on shared machines
# and does not change the result.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from tokenizers import (  # noqa: E402
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

ROOT = Path(__file__).resolve().parent.parent

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)  # in id order: 0, 1, 2, 3, 4

# A simplified DeepSeek-V3 chat template: system prompts (joined by a blank line) right after bos, then
# "<｜User｜>text" and "<｜Assistant｜>text<｜end▁of▁sentence｜>" turns,
# and "<｜Assistant｜>" to prompt a reply.
# DeepSeek-V3's full template adds tool calls and tool outputs, which this model never saw.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = ns.system_prompt + ('\\n\\n' if ns.system_prompt else '') + message['content'] %}"
    "{% elif message['role'] not in ('user', 'assistant') %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def added_token(content: str) -> dict:
    """A special token as DeepSeek-V3's tokenizer_config.json spells it."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def train(corpus: Path, vocab_size: int) -> Tokenizer:
    """Learn BPE merges on ``corpus``; ``vocab_size`` counts the special tokens and the 256 byte symbols."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus)], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 0)]
    )
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {expected_id}")
    return tokenizer


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` with DeepSeek-V3's fields; pad is DeepSeek's own pad token."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added_token(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": added_token(EOS),
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": added_token(PAD),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus" / "train.txt")
    parser.add_argument("--out", type=Path, default=ROOT / "dsv3" / "bundled")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    if not args.corpus.is_file():
        raise SystemExit(f"{args.corpus} not found; build it first with `python scripts/build_corpus.py`")

    tokenizer = train(args.corpus, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    config_text = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (args.out / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    print(f"{args.out}: vocabulary of {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
