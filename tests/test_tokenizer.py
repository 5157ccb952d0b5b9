"""The bundled tokenizer: ids, round trips, chat template, streaming decode, parity with transformers."""

import json
import shutil
from pathlib import Path

import pytest

from dsv3.tokenizer import Tokenizer

BUNDLED = Path(__file__).resolve().parent.parent / "dsv3" / "bundled"

TEXTS = [
    "dog (noun): a member of the genus Canis; \"the dog barked all night\"",
    "  leading spaces, trailing spaces  \nand a second line\n",
    "naïve café, résumé — “quotes” in 1821-1905",
    "東京は日本の首都です。",
    "emoji 😀👍🏽 and a snowman ☃",
    "",
]

CHAT = [
    {"role": "system", "content": "Answer like a dictionary."},
    {"role": "user", "content": "What is a dog?"},
    {"role": "assistant", "content": "dog (noun): a domesticated canine"},
    {"role": "user", "content": "And a cat?"},
]
CHAT_TEXT = (
    "<｜begin▁of▁sentence｜>Answer like a dictionary."
    "<｜User｜>What is a dog?"
    "<｜Assistant｜>dog (noun): a domesticated canine<｜end▁of▁sentence｜>"
    "<｜User｜>And a cat?"
    "<｜Assistant｜>"
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(BUNDLED)


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(BUNDLED)


def test_special_tokens_are_deepseek_v3s(tok):
    assert (tok.bos_token, tok.bos_token_id) == ("<｜begin▁of▁sentence｜>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<｜end▁of▁sentence｜>", 1)
    assert (tok.pad_token, tok.pad_token_id) == ("<｜▁pad▁｜>", 2)
    assert tok.encode("<｜User｜><｜Assistant｜>", add_special_tokens=False) == [3, 4]
    assert tok.vocab_size == 8192


def test_encode_adds_bos_only(tok):
    ids = tok.encode("a dog")
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert ids[1:] == tok.encode("a dog", add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text)) == tok.bos_token + text


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match="token id 8192"):
        tok.decode([5, 8192])


def test_chat_template_two_turns(tok):
    assert tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == CHAT_TEXT
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert ids == tok.encode(CHAT_TEXT, add_special_tokens=False)
    assert ids[0] == 0 and ids.count(0) == 1 and ids[-1] == 4
    without_prompt = tok.apply_chat_template(CHAT, tokenize=False)
    assert without_prompt == CHAT_TEXT.removesuffix("<｜Assistant｜>")


def test_chat_template_flattens_text_parts(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "a dog?"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<｜begin▁of▁sentence｜><｜User｜>What is\na dog?"
    with pytest.raises(ValueError, match=r"messages\[0\]: content part 0"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "x"}]}])


def test_chat_template_rejects_bad_messages(tok):
    with pytest.raises(ValueError, match=r"messages\[1\]: role 'tool' is not one of system, user, assistant"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\]: 'content' is missing"):
        tok.apply_chat_template([{"role": "user"}])


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_file_is_named(tmp_path, missing):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if name != missing:
            shutil.copy(BUNDLED / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=missing):
        Tokenizer.from_pretrained(tmp_path)


def test_config_variants(tmp_path, tok):
    """Special tokens as plain strings, add_eos_token honoured, a bad special token named."""
    shutil.copy(BUNDLED / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((BUNDLED / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=None, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    plain = Tokenizer.from_pretrained(tmp_path)
    assert plain.pad_token_id is None
    assert plain.encode("a dog") == tok.encode("a dog") + [tok.eos_token_id]

    config["bos_token"] = {"content": "<not a token>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="bos_token '<not a token>'"):
        Tokenizer.from_pretrained(tmp_path)
    config["bos_token"] = 7
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="bos_token must be a string"):
        Tokenizer.from_pretrained(tmp_path)


def test_malformed_config_files_are_named_at_load(tmp_path):
    """tokenizer_config.json that is not UTF-8, a chat template that does not parse (found at load, not at the
    first chat), a file given as the directory: each a one-line error naming the file."""
    shutil.copy(BUNDLED / "tokenizer.json", tmp_path / "tokenizer.json")
    config_path = tmp_path / "tokenizer_config.json"
    config_path.write_bytes(b'{"bos_token": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json is not UTF-8 text \(byte 18"):
        Tokenizer.from_pretrained(tmp_path)
    config = json.loads((BUNDLED / "tokenizer_config.json").read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "chat_template": "{% for m in messages %}\n{{ m[ }}"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template line 2: "):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        Tokenizer.from_pretrained(config_path)


def test_text_that_is_not_unicode_is_refused(tok):
    """A lone surrogate (undecodable input bytes under surrogateescape, or a JSON \\udcff escape): a ValueError
    that says so, not the tokenizers library's TypeError."""
    undecodable = b"hi \xff there".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="not valid Unicode text: a lone surrogate at character 3"):
        tok.encode(undecodable)
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.apply_chat_template([{"role": "user", "content": undecodable}])


@pytest.mark.parametrize("text", TEXTS[2:5] + [CHAT_TEXT + "🐈"])
def test_incremental_decoding_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    decoder = tok.incremental_decoder()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") > 1  # some token ended mid-character and was held back


def test_incremental_decoding_flushes_an_incomplete_character(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    decoder = tok.incremental_decoder()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == "\ufffd"


def test_transformers_gives_the_same_ids(tok, hf_tok):
    for text in TEXTS:
        assert hf_tok.encode(text) == tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    ids = tok.encode(CHAT_TEXT)
    assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2)


def test_transformers_renders_the_same_chat(tok, hf_tok):
    for prompt in (False, True):
        text = hf_tok.apply_chat_template(CHAT, add_generation_prompt=prompt, tokenize=False)
        assert text == tok.apply_chat_template(CHAT, add_generation_prompt=prompt, tokenize=False)
        ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=prompt, tokenize=True, return_dict=False)
        assert list(ids) == tok.apply_chat_template(CHAT, add_generation_prompt=prompt)
