"""What goes into the engine (`Request`), what comes out (`Delta`s), and the handle a caller holds in between.

The engine runs in its own thread; callers may be plain threads or an asyncio event loop (the server). A
`RequestHandle` created inside a running event loop delivers deltas through an `asyncio.Queue` fed with
`loop.call_soon_threadsafe`, so awaiting a stream blocks no thread; one created elsewhere uses a `queue.Queue`.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams

_ids = itertools.count()


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; the server answers 503 with Retry-After."""


class ContextLengthError(ValueError):
    """prompt + max_new_tokens does not fit the engine's max_seq_len; the server answers 400."""


@dataclass
class Request:
    """One sequence to generate.

    prompt_ids: the prompt's token ids (bos included if wanted); stop: strings that end generation (not returned);
    logprobs: None for none, k >= 0 for the chosen token's logprob plus the k most likely alternatives;
    prompt_logprobs: None, or k >= 0 for the logprob of every prompt token (the first gets None) plus k alternatives,
    as `echo` with `logprobs` needs (lm-eval's log-likelihoods). Such a request recomputes its whole prompt: cached
    blocks carry no logits. ignore_eos: keep going past the end-of-sequence token (benchmarks). cache_salt: the
    prefix cache shares blocks only between requests with the same salt (None: the unsalted pool); the server
    salts with the caller's key id so that tenants do not share (dsv3/engine/prefix_cache.py). inputs_embeds: see
    below.
    """

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    cache_salt: str | None = None
    # [len(prompt_ids), D]: the prefill's inputs in place of the prompt's token embeddings (a vision-language
    # prompt: image positions hold projected image features, dsv3/vision). Such a prompt skips the prefix cache,
    # whose blocks are keyed by token ids alone.
    inputs_embeds: torch.Tensor | None = None


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and the `top` most likely (token id, logprob) pairs there."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Delta:
    """What one engine step produced for a request.

    text: newly released text (may be empty while a possible stop string is held back); token_ids and logprobs: the
    tokens generated this step (logprobs only when asked for); prompt_logprobs: on the first delta only, when asked
    for (index 0 is None); finish_reason: "stop", "length", "abort" or "error" on the last delta, with usage;
    error: a message when finish_reason is "error".
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


class RequestHandle:
    """The caller's side of a submitted request: iterate it (sync or async) for `Delta`s until one has a
    finish_reason; `cancel()` makes the engine drop it at its next step (its last delta then says "abort")."""

    def __init__(self, request: Request) -> None:
        self.id = next(_ids)
        self.request = request
        self.cancelled = threading.Event()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if self._loop else queue.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, delta: Delta) -> None:
        """Called by the engine thread."""
        if self._loop is None:
            self._queue.put(delta)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
        except RuntimeError:  # the caller's event loop has closed: nobody is listening any more
            self.cancel()

    def __iter__(self):
        if self._loop is not None:
            raise RuntimeError("this request was submitted inside an event loop; use `async for`")
        while True:
            delta = self._queue.get()
            yield delta
            if delta.finish_reason is not None:
                return

    async def __aiter__(self):
        if self._loop is None:
            raise RuntimeError("this request was submitted outside an event loop; iterate it with `for`")
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finish_reason is not None:
                return


@dataclass
class Result:
    """A finished request, all its deltas merged (`Result.of(handle)` waits for them in a plain thread)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None

    @classmethod
    def merge(cls, deltas: list[Delta]) -> "Result":
        last = deltas[-1]
        logprobs = [lp for d in deltas for lp in (d.logprobs or [])]
        return cls(text="".join(d.text for d in deltas), token_ids=[t for d in deltas for t in d.token_ids],
                   finish_reason=last.finish_reason, usage=last.usage, logprobs=logprobs or None,
                   prompt_logprobs=deltas[0].prompt_logprobs, error=last.error)

    @classmethod
    def of(cls, handle: RequestHandle) -> "Result":
        return cls.merge(list(handle))
