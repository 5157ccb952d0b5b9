"""Example server plugin (`dsv3 serve --plugin dsv3.plugins:RedactEmails`).

A plugin is any class constructible without arguments with either or both of
- `pre_process(messages: list[dict]) -> list[dict]`: sees the chat messages ({"role", "content": str}) before the
  chat template renders them;
- `post_process(text: str) -> str`: sees each choice's text (non-streaming) or each streamed text piece.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


class RedactEmails:
    """Replaces e-mail addresses with "[email]" in what users send and in what the model writes, so neither the
    model nor the client sees one. (A streamed address split across two pieces is not caught.)"""

    replacement = "[email]"

    def pre_process(self, messages: list[dict]) -> list[dict]:
        return [{**m, "content": EMAIL.sub(self.replacement, m["content"])} for m in messages]

    def post_process(self, text: str) -> str:
        return EMAIL.sub(self.replacement, text)
