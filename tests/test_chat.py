"""dsv3 chat: the session keeps and renders the conversation, the REPL's commands, the CLI end to end."""

import argparse
import io
import shutil
from pathlib import Path

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.chat import COMPILING, ChatSession, add_cli, repl
from dsv3.generation import stream_text
from dsv3.tokenizer import Tokenizer

BUNDLED = Path(__file__).resolve().parents[1] / "dsv3" / "bundled"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(BUNDLED)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(ModelConfig.tiny(vocab_size=tokenizer.vocab_size)).eval()


def scripted(lines):
    """An input() stand-in that returns `lines` in turn, then signals end of input (Ctrl-D)."""
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_reply_renders_the_whole_conversation(model, tokenizer):
    session = ChatSession(model, tokenizer, system="Be brief.", max_new_tokens=6, temperature=0.0)
    first = "".join(session.reply("Hello"))
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    prompt = tokenizer.apply_chat_template(expected, add_generation_prompt=True)
    assert first == "".join(stream_text(model, tokenizer, prompt, 6, temperature=0.0))
    assert session.messages == expected + [{"role": "assistant", "content": first}]
    second = "".join(session.reply("And then?"))
    history = session.messages[:3] + [{"role": "user", "content": "And then?"}]
    prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
    assert second == "".join(stream_text(model, tokenizer, prompt, 6, temperature=0.0))
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_seeded_session_replays_identically(model, tokenizer):
    def answers():
        session = ChatSession(model, tokenizer, max_new_tokens=6, temperature=1.0, seed=3)
        return ["".join(session.reply("Hi")) for _ in range(2)]

    a = answers()
    assert a == answers() and a[0] != a[1]  # turn i uses seed + i


def test_interrupted_answer_is_kept_as_far_as_it_went(model, tokenizer):
    session = ChatSession(model, tokenizer, max_new_tokens=8, temperature=0.0)
    pieces = session.reply("Hello")
    first = next(pieces)
    pieces.close()
    assert session.messages[-1] == {"role": "assistant", "content": first}


def test_invalid_settings_fail_at_construction(model, tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        ChatSession(model, tokenizer, temperature=-1.0)


def test_repl_commands_and_end_of_input(model, tokenizer):
    session = ChatSession(model, tokenizer, max_new_tokens=4, temperature=0.0)
    out = io.StringIO()
    repl(session, scripted(["Hello", "", "/help", "/reset"]), out)
    text = out.getvalue()
    assert "unknown command /help" in text and "(new conversation)" in text and text.endswith("\n")
    assert session.messages == []  # /reset came last
    lines = iter(["/exit", "never read"])
    repl(session, lambda prompt: next(lines), io.StringIO())
    assert next(lines) == "never read"


def test_repl_reports_a_full_context_and_keeps_going(tokenizer):
    torch.manual_seed(0)
    small = Transformer(ModelConfig.tiny(vocab_size=tokenizer.vocab_size, max_position_embeddings=16)).eval()
    session = ChatSession(small, tokenizer, max_new_tokens=4, temperature=0.0)
    out = io.StringIO()
    repl(session, scripted(["word " * 40, "hi"]), out)
    assert "error: the conversation" in out.getvalue() and "/reset" in out.getvalue()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # the too-long turn was dropped


def test_repl_refuses_input_that_is_not_utf8_and_keeps_going(model, tokenizer):
    """A line holding bytes that are not UTF-8 (stdin decodes them with surrogateescape): one error line, the
    conversation without it, the next line answered."""
    session = ChatSession(model, tokenizer, max_new_tokens=3, temperature=0.0)
    out = io.StringIO()
    repl(session, scripted([b"caf\xe9".decode("utf-8", "surrogateescape"), "hi"]), out)
    assert "error: the text to encode is not valid Unicode text" in out.getvalue()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"] == "hi"


def test_cli_chat_with_a_saved_model(model, tmp_path):
    from dsv3.checkpoint import save_pretrained

    save_pretrained(model, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED / name, tmp_path / name)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["chat", "--model", str(tmp_path), "--max-new-tokens", "5", "--temperature", "0",
                              "--system", "You are terse.", "--device", "cpu"])
    out = io.StringIO()
    assert args.func(args, scripted(["Hello"]), out) == 0
    session = ChatSession(model, Tokenizer.from_pretrained(tmp_path), system="You are terse.", max_new_tokens=5,
                          temperature=0.0)
    assert "".join(session.reply("Hello")) in out.getvalue()
    bad = parser.parse_args(["chat", "--model", str(tmp_path), "--top-p", "0"])
    with pytest.raises(SystemExit, match="top_p"):
        bad.func(bad)
    undecodable = parser.parse_args(["chat", "--model", str(tmp_path), "--system", b"\xff".decode("utf-8",
                                                                                               "surrogateescape")])
    with pytest.raises(SystemExit, match="--system is not valid Unicode text"):
        undecodable.func(undecodable)
    missing = parser.parse_args(["chat", "--model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="nowhere: no such directory"):
        missing.func(missing)


def test_cli_chat_compile_flag_reaches_the_decode_step(model, tmp_path, monkeypatch):
    """--compile makes generation ask for the compiled decode step and prefill; they are stubbed with their eager
    forms here (compiling takes minutes; tests/test_fast.py checks the compiled ones)."""
    from dsv3 import fast, generation
    from dsv3.checkpoint import save_pretrained

    save_pretrained(model, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED / name, tmp_path / name)
    asked = []
    monkeypatch.setattr(generation, "decode_step", lambda compile, device_type: asked.append(compile) or (
        fast.static_step if compile else generation._step))
    monkeypatch.setattr(generation, "prefill_step",
                        lambda compile, device_type: asked.append(("prefill", compile)) or generation._prefill)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    outputs = []
    for flags in ([], ["--compile"]):
        args = parser.parse_args(["chat", "--model", str(tmp_path), "--max-new-tokens", "5", "--temperature", "0",
                                  "--device", "cpu", *flags])
        out = io.StringIO()
        assert args.func(args, scripted(["Hello"]), out) == 0
        outputs.append(out.getvalue())
    assert asked == [False, ("prefill", False), True, ("prefill", True)]
    assert COMPILING not in outputs[0] and COMPILING + "\n" in outputs[1]  # said before the silent compile
    assert outputs[1].replace(COMPILING + "\n", "") == outputs[0]
