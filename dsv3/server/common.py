"""What the chat and completions endpoints share: request fields -> engine requests, engine deltas -> usage,
finish accounting, SSE framing, and the client-disconnect handling.

One HTTP request becomes one engine request per choice (`n`, and per prompt for completions), a `Job`. Its deltas are
merged into one stream of (choice index, delta); whatever ends that stream (the client going away included) cancels
the unfinished choices, so they leave the engine's batch at its next step. Usage counts each prompt once, sums
completion tokens over choices, and reports the prefix cache's hits as OpenAI's
`prompt_tokens_details.cached_tokens` and DeepSeek's prompt_cache_hit/miss_tokens
(docs/openai-api.md §1.4, §4).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..engine import ContextLengthError, Delta, QueueFullError, Request, Result
from ..sampling import SamplingParams
from .errors import APIError, bad_request
from .security import retry_after_header

HEARTBEAT_SECONDS = 10.0
FINGERPRINT = "fp_dsv3"


@dataclass
class Job:
    """The engine requests behind one HTTP request: `handles[k]` is choice k; `prompt_of[k]` its prompt index."""

    handles: list
    prompt_of: list[int]
    arrival: float = field(default_factory=time.monotonic)
    first_token: dict[int, float] = field(default_factory=dict)

    def cancel(self) -> None:
        """Cancel every choice (finished ones ignore it). Also run after a streamed response, because a client
        that leaves before the stream's first chunk never starts the generator whose cleanup would do it."""
        for h in self.handles:
            h.cancel()


# ---------------------------------------------------------------------------------------------- request -> engine
def sampling_params(state, body, max_new: int, index: int) -> SamplingParams:
    """The engine's SamplingParams for choice `index`; bounds that depend on the model are checked here (the schema
    checks the rest), so every refusal is a 400 naming its field."""
    vocab = state.engine.vocab_size
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise bad_request(f"logit_bias: key {key!r} is not a token id in [0, {vocab})", "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias: value {value} for token {key} is outside [-100, 100]", "logit_bias")
        bias[int(key)] = value
    if body.top_k is not None and body.top_k > vocab:
        raise bad_request(f"top_k: must be -1 or 0 (off) or at most the vocabulary size {vocab}, got {body.top_k}",
                          "top_k")
    if any(not 0 <= t < vocab for t in body.stop_token_ids or ()):
        raise bad_request(f"stop_token_ids: token ids must be in [0, {vocab})", "stop_token_ids")
    temperature = 1.0 if body.temperature is None else body.temperature
    try:
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=0.0 if temperature < 1e-5 else temperature,  # vLLM's epsilon: below it, greedy
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            min_p=body.min_p or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            logit_bias=bias,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            seed=None if body.seed is None else (body.seed + index) % 2**63,
        )
    except ValueError as error:  # SamplingParams names the field first; the API calls max_new_tokens max_tokens
        field = str(error).split(" ", 1)[0]
        raise bad_request(str(error), {"max_new_tokens": "max_tokens"}.get(field, field)) from None


def check_logprob_values(state, count: int, param: str) -> None:
    """Refuse a request whose logprobs would exceed max_logprob_values: count = the (top + 1) values its choices
    ask for, summed over generated (and, with echo, prompt) tokens. A 155-byte request can otherwise ask for
    n=16 x 2048 tokens x 21 values, megabytes of JSON built on the event loop."""
    limit = state.settings.max_logprob_values
    if count > limit:
        raise bad_request(f"{param}: this request asks for {count} log-probabilities (n x tokens x (top_logprobs + "
                          f"1)), more than this server's limit of {limit}; ask for fewer choices, tokens or "
                          "alternatives", param)


def stop_strings(body) -> tuple[str, ...]:
    stop = body.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in stops):
        raise bad_request("stop: stop strings must be non-empty", "stop")
    return stops


def check_text_fits(state, chars: int, param: str) -> None:
    """Refuse, before tokenising, a text that cannot fit the context. A byte-level BPE tokenizer without a
    normalizer (DeepSeek's) spends one token per at most `longest_token` bytes of text, and a character is at least
    one byte, so more characters than max_seq_len x longest_token are more tokens than the context holds. This
    matters because the tokenizers library's encode holds the GIL: a 4 MB prompt tokenised in a worker thread
    still stalls the event loop (and /health) for seconds."""
    limit = state.engine.max_seq_len
    if chars > limit * state.longest_token:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, your {param} has "
                          f"{chars} characters, more than {limit} tokens can hold.", param, "context_length_exceeded")


def max_new_tokens(state, body, prompt_len: int, requested: int | None, param: str) -> int:
    limit = state.engine.max_seq_len
    if requested is None:
        requested = limit - prompt_len
        if requested < 1:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your {param} "
                              f"has {prompt_len} tokens, which leaves no room for the completion.", param,
                              "context_length_exceeded")
    elif prompt_len + requested > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                          f"{prompt_len + requested} tokens ({prompt_len} in the {param}, {requested} in the "
                          "completion). Please reduce the length of the prompt or the completion.", param,
                          "context_length_exceeded")
    return requested


def submit(state, requests: list[Request], param: str) -> list:
    """Submit every choice, or none: if one is refused, the ones already queued are cancelled."""
    handles = []
    try:
        for request in requests:
            handles.append(state.engine.submit(request))
    except (QueueFullError, ValueError) as error:
        for h in handles:
            h.cancel()
        if isinstance(error, QueueFullError):
            raise APIError(503, str(error), code="queue_full", headers=retry_after_header(1)) from None
        code = "context_length_exceeded" if isinstance(error, ContextLengthError) else None
        raise bad_request(str(error), param, code) from None
    return handles


def check_model(state, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


# ---------------------------------------------------------------------------------------------- engine -> output
async def merged_deltas(job: Job):
    """(choice index, Delta) from all choices as they come; (None, None) after HEARTBEAT_SECONDS of silence.
    Whatever ends the iteration (the client going away included), unfinished choices are cancelled."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, handle):
        async for delta in handle:
            await queue.put((k, delta))

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(job.handles)]
    remaining = len(tasks)
    try:
        while remaining:
            try:
                k, delta = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
            except asyncio.TimeoutError:
                yield None, None
                continue
            if delta.token_ids and k not in job.first_token:
                job.first_token[k] = time.monotonic()
            remaining -= delta.finish_reason is not None
            yield k, delta
    finally:
        job.cancel()
        for t in tasks:
            t.cancel()


async def collect_results(request: HTTPRequest, job: Job) -> list[Result]:
    """Wait for every choice; a client that disconnects meanwhile cancels them."""
    deltas: list[list[Delta]] = [[] for _ in job.handles]

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for k, delta in merged_deltas(job):
            if k is not None:
                deltas[k].append(delta)
    finally:
        watcher.cancel()
    return [Result.merge(d) for d in deltas]


def observe_finish(state, job: Job, k: int, delta: Delta) -> None:
    if delta.finish_reason in ("stop", "length"):
        state.metrics.observe_generation(delta.usage, delta.finish_reason, job.arrival, job.first_token.get(k),
                                         time.monotonic())


def usage_body(job: Job, usages: list) -> dict:
    """Prompts count once however many choices they have; completion tokens add up over choices."""
    first = {}
    for k, u in enumerate(usages):
        first.setdefault(job.prompt_of[k], u)
    prompt = sum(u.prompt_tokens for u in first.values())
    cached = sum(u.cached_tokens for u in first.values())
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}, "prompt_cache_hit_tokens": cached,
            "prompt_cache_miss_tokens": prompt - cached}


def engine_failure(delta: Delta) -> APIError:
    message = delta.error or "the request was aborted because the server is shutting down"
    return APIError(500 if delta.finish_reason == "error" else 503, message, code="engine_error")


def post_process(state, text: str) -> str:
    for plugin in state.plugins:
        if hasattr(plugin, "post_process"):
            text = plugin.post_process(text)
    return text


def token_text(state, token_id: int) -> str:
    return state.tokenizer.decode([token_id])


async def json_response(build) -> Response:
    """The JSON response `build()` returns, built and serialised in a worker thread: with logprobs it decodes
    every token, which on the event loop would stall every stream and /health meanwhile."""
    def render() -> bytes:  # as starlette's JSONResponse renders
        return json.dumps(build(), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

    return Response(await run_in_threadpool(render), media_type="application/json")


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def stream_chunk(state, body, rid: str, created: int, object_name: str):
    """(chunk, include_usage) for one stream: chunk(choices, usage=None) -> one SSE event in the envelope both
    endpoints share; it carries "usage" (null until the final chunk) only when stream_options.include_usage asks."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, usage=None):
        payload = {"id": rid, "object": object_name, "created": created, "model": state.model_name,
                   "system_fingerprint": FINGERPRINT, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return sse(payload)

    return chunk, include_usage


async def stream_choices(state, job: Job, chunk, include_usage: bool, render):
    """The SSE loop both endpoints share: keep-alive comments, a mid-stream engine failure as an error event,
    per-choice finish accounting, the final usage chunk when asked for, and `data: [DONE]`.

    chunk(choices, usage=None) -> one SSE event; render(k, delta, text) -> the events for one delta of choice k
    (text already post-processed by the plugins).
    """
    usages = [None] * len(job.handles)
    async for k, delta in merged_deltas(job):
        if k is None:
            yield ": keep-alive\n\n"
            continue
        if delta.finish_reason in ("error", "abort"):
            yield sse(engine_failure(delta).body())
            return
        for event in render(k, delta, post_process(state, delta.text) if delta.text else ""):
            yield event
        if delta.finish_reason is not None:
            usages[k] = delta.usage
            observe_finish(state, job, k, delta)
    if include_usage:
        yield chunk([], usage_body(job, usages))
    yield "data: [DONE]\n\n"
