"""The tokenizer: a DeepSeek-V3 checkpoint's ``tokenizer.json`` + ``tokenizer_config.json`` over ``tokenizers``.

A DeepSeek-V3 checkpoint ships its tokenizer as two files. ``tokenizer.json`` is a complete pipeline of the
Hugging Face ``tokenizers`` library (byte-level BPE), so encoding and decoding are delegated to it.
``tokenizer_config.json`` is the transformers-side configuration: which strings are the bos/eos/pad tokens
(written either as plain strings or as ``{"__type": "AddedToken", "content": ...}`` dicts), whether bos/eos are
added when encoding, and the Jinja ``chat_template``. This module reads both the way
``transformers.AutoTokenizer`` does, so that both give the same ids for the same text — the tests check it.

Streaming generation needs text as tokens arrive, but a byte-level token can end in the middle of a multi-byte
UTF-8 character; :class:`IncrementalDecoder` holds such bytes back until the character is complete.

Sources: transformers 5 ``TokenizersBackend`` (how ``add_bos_token``/``add_eos_token`` rebuild the post-processor)
and ``utils/chat_template_utils.py`` (the sandboxed Jinja environment chat templates are rendered in); the
incremental detokenisation scheme of Hugging Face text-generation-inference (decode a short window of recent
tokens twice, with and without the newest ones, and emit the difference).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors

ROLES = ("system", "user", "assistant")
REPLACEMENT_CHARACTER = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence


def require_unicode(text: str, what: str) -> None:
    """Refuse a str holding a lone surrogate: what Python makes of bytes that are not UTF-8 (stdin and argv under
    a UTF-8 locale decode them with surrogateescape) and what JSON's \\ud800 escapes carry. The tokenizers library
    rejects it with an unrelated TypeError ("TextEncodeInput must be Union[...]")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} is not valid Unicode text: a lone surrogate at character {error.start} (bytes "
                         "that are not UTF-8?)") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent}; a tokenizer directory needs it")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _special_token(config: Mapping, key: str) -> str | None:
    """A special token from ``tokenizer_config.json``: a string, an AddedToken dict, or null/absent."""
    value = config.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(
        f"tokenizer_config.json: {key} must be a string or an object with a string 'content', got {value!r}"
    )


def _raise_exception(message: str) -> None:
    """Lets a chat template reject its input, as transformers' ``raise_exception`` helper does."""
    raise jinja2.TemplateError(message)


def _message_text(content: object, where: str) -> str:
    """Message content as one string: a string, or a list of ``{"type": "text", "text": ...}`` parts joined by
    newlines (the OpenAI content-part format; vLLM flattens it the same way for string-only templates)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: content part {i} must be {{'type': 'text', 'text': str}}, got {part!r}")
        texts.append(part["text"])
    return "\n".join(texts)


class Tokenizer:
    """Byte-level BPE tokenizer with special tokens and a chat template, as DeepSeek-V3 checkpoints ship it.

    Usually built with :meth:`from_pretrained`. ``add_bos_token``/``add_eos_token``, when given, replace the
    pipeline's post-processor by one that adds exactly those tokens, as transformers does when the config sets
    them; when both are None the post-processor in ``tokenizer.json`` is kept.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ):
        self._backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self._require_id("bos_token", bos_token)
        self.eos_token_id = self._require_id("eos_token", eos_token)
        self.pad_token_id = None if pad_token is None else self._require_id("pad_token", pad_token)
        self.chat_template = chat_template
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` from the directory ``path``."""
        directory = Path(path)
        if not directory.is_dir():
            what = "is a file, not a directory" if directory.exists() else "does not exist"
            raise FileNotFoundError(f"tokenizer directory {directory} {what}")
        config_path, backend_path = directory / "tokenizer_config.json", directory / "tokenizer.json"
        config = _read_json(config_path)
        if not backend_path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found in {directory}; a tokenizer directory needs it")
        try:
            backend = tokenizers.Tokenizer.from_file(str(backend_path))
        except Exception as error:  # the tokenizers library raises a bare Exception for malformed files
            raise ValueError(f"{backend_path} is not a valid tokenizers file: {error}") from None
        bos_token, eos_token = _special_token(config, "bos_token"), _special_token(config, "eos_token")
        for key, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is None:
                raise ValueError(f"{config_path}: {key} is missing")
        chat_template = config.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            # transformers also allows a list of named templates; DeepSeek-V3 ships a single string.
            raise ValueError(f"{config_path}: chat_template must be a string")
        for key in ("add_bos_token", "add_eos_token"):
            if key in config and not isinstance(config[key], bool):
                raise ValueError(f"{config_path}: {key} must be true or false, got {config[key]!r}")
        tokenizer = cls(
            backend,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=_special_token(config, "pad_token"),
            chat_template=chat_template,
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
        )
        if chat_template is not None:  # compiled now: a broken template fails at load, not at the first chat
            try:
                tokenizer._template
            except jinja2.TemplateSyntaxError as error:
                raise ValueError(f"{config_path}: chat_template line {error.lineno}: {error.message}") from None
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included: the rows the model's embedding needs."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the post-processor adds bos (and eos if configured)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        require_unicode(text, "the text to encode")
        # encode_batch releases the GIL while it works (encode holds it): a server tokenising a multi-MB prompt in
        # a worker thread keeps answering other requests (a 4 MB text: longest event-loop pause 2.8 s -> 0.1 s)
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; bytes that do not form valid UTF-8 come out as U+FFFD.

        ``clean_up_tokenization_spaces`` is not applied: transformers 5 ignores it for BPE tokenizers too.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh streaming detokeniser over this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render ``messages`` (dicts with ``role`` and ``content``) with the chat template.

        Returns the token ids, or the text when ``tokenize`` is False. The template writes bos itself, so the
        text is encoded without adding special tokens, as transformers does.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json lacks one)")
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
        plain = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, Mapping):
                raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
            if message.get("role") not in ROLES:
                raise ValueError(f"{where}: role {message.get('role')!r} is not one of {', '.join(ROLES)}")
            if "content" not in message:
                raise ValueError(f"{where}: 'content' is missing")
            plain.append({**message, "content": _message_text(message["content"], where)})
        text = self._template.render(
            messages=plain,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @cached_property
    def _template(self) -> jinja2.Template:
        # The environment transformers renders chat templates in: sandboxed and immutable (a template cannot
        # touch Python internals or mutate its inputs), block tags swallow their own line breaks and indentation.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        return env.from_string(self.chat_template)

    def _require_id(self, key: str, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{key} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        def sequence(name: str, type_id: int) -> str:
            parts = [f"{self.bos_token}:{type_id}"] if add_bos else []
            parts.append(f"${name}:{type_id}")
            parts += [f"{self.eos_token}:{type_id}"] if add_eos else []
            return " ".join(parts)

        special = [(self.bos_token, self.bos_token_id)] if add_bos else []
        special += [(self.eos_token, self.eos_token_id)] if add_eos else []
        self._backend.post_processor = processors.TemplateProcessing(
            single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}", special_tokens=special
        )


class IncrementalDecoder:
    """Turns a stream of token ids into text, never emitting half a UTF-8 character.

    ``push`` decodes a short window of recent tokens twice — up to the last emitted token, and up to the newest —
    and returns the difference. While the newest text ends in U+FFFD the last token stopped mid-character, so
    nothing is emitted until later tokens complete it. Keeping the last emitted tokens in the window as context
    keeps decoders that treat a sequence's first token specially (leading-space stripping) exact, and only that
    window is kept. The concatenation of everything ``push`` and ``flush`` return equals
    ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window: context tokens, then tokens not yet emitted
        self._read = 0  # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        emitted = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if text.endswith(REPLACEMENT_CHARACTER) or len(text) <= len(emitted):
            return ""
        del self._ids[: self._read]  # the tokens just emitted become the next window's context
        self._read = len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character comes out as U+FFFD) and start afresh."""
        emitted = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
