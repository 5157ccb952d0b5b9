"""The generation endpoints: `/v1/chat/completions` and `/v1/completions`, in the shapes the openai SDK parses.

Request -> token ids (chat template for chat; encode or raw ids for completions) -> one engine request per choice
(`n`, and per prompt for completions) -> either one JSON body or an SSE stream:
`data: {chunk}` events with the same id, role in the first chat delta, content deltas, a `delta: {}` chunk with
finish_reason, an optional usage chunk with `choices: []`, then `data: [DONE]`; `: keep-alive` comments while
nothing is produced; a failure mid-stream is a `data: {"error": ...}` event (../shared/reference/compat-server.md
§1.5, §2). Usage carries `prompt_tokens_details.cached_tokens` and DeepSeek's prompt_cache_hit/miss_tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine import ContextLengthError, Delta, QueueFullError, Request, Result, TokenLogprob
from ..sampling import SamplingParams
from .errors import APIError, bad_request
from .schemas import ChatCompletionRequest, CompletionRequest
from .security import retry_after_header

HEARTBEAT_SECONDS = 10.0
FINGERPRINT = "fp_dsv3"
_NON_TEXT_PARTS = ("image_url", "input_image", "image", "input_audio", "audio", "file", "video_url")


@dataclass
class Job:
    """The engine requests behind one HTTP request: `handles[k]` is choice k; `prompt_of[k]` its prompt index."""

    handles: list
    prompt_of: list[int]
    arrival: float = field(default_factory=time.monotonic)
    first_token: dict[int, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- request -> engine
def _sampling(state, body, max_new: int, index: int) -> SamplingParams:
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < state.engine.vocab_size:
            raise bad_request(f"logit_bias: key {key!r} is not a token id in [0, {state.engine.vocab_size})",
                              "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias: value {value} for token {key} is outside [-100, 100]", "logit_bias")
        bias[int(key)] = value
    temperature = 1.0 if body.temperature is None else body.temperature
    try:
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=0.0 if temperature < 1e-5 else temperature,  # vLLM's epsilon: below it, greedy
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            logit_bias=bias,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            seed=None if body.seed is None else (body.seed + index) % 2**63,
        )
    except ValueError as error:
        raise bad_request(str(error)) from None


def _stops(body) -> tuple[str, ...]:
    stop = body.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in stops):
        raise bad_request("stop: stop strings must be non-empty", "stop")
    return stops


def _max_new(state, body, prompt_len: int, requested: int | None, param: str) -> int:
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


def _submit(state, requests: list[Request], param: str) -> list:
    handles = []
    try:
        for request in requests:
            handles.append(state.engine.submit(request))
    except QueueFullError as error:
        for h in handles:
            h.cancel()
        raise APIError(503, str(error), code="queue_full", headers=retry_after_header(1)) from None
    except ContextLengthError as error:
        for h in handles:
            h.cancel()
        raise bad_request(str(error), param, "context_length_exceeded") from None
    except ValueError as error:
        for h in handles:
            h.cancel()
        raise bad_request(str(error), param) from None
    return handles


def _check_model(state, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def chat_prompt(state, body: ChatCompletionRequest) -> list[int]:
    """Messages -> the chat template's token ids (with the assistant prompt), after the plugins' pre_process."""
    messages = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role in ("tool", "function"):
            raise bad_request(f"messages[{i}]: role '{m.role}' is not supported: this model has no tool calling",
                              "messages")
        if m.content is None:
            if role != "assistant":
                raise bad_request(f"messages[{i}]: content is null; only assistant messages may omit it",
                                  "messages")
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            pieces = []
            for j, part in enumerate(m.content):
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif kind in _NON_TEXT_PARTS:
                    raise bad_request(f"messages[{i}].content[{j}]: '{kind}' parts are not supported: this is a "
                                      "text-only model", "messages")
                else:
                    raise bad_request(f"messages[{i}].content[{j}]: expected {{'type': 'text', 'text': str}}, "
                                      f"got type {kind!r}", "messages")
            text = "\n".join(pieces)
        messages.append({"role": role, "content": text})
    for plugin in state.plugins:
        if hasattr(plugin, "pre_process"):
            messages = plugin.pre_process(messages)
    try:
        return state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as error:  # template rejections, unencodable text: the request's fault
        raise bad_request(f"messages could not be rendered with the chat template: {error}", "messages") from None


def _completion_prompts(state, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """`prompt` in any of its four forms -> (token ids, text) per prompt."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            try:
                ids.append(state.tokenizer.encode(p))
            except Exception as error:
                raise bad_request(f"prompt could not be tokenized: {error}", "prompt") from None
            texts.append(p)
        else:
            if not p or not all(0 <= t < state.engine.vocab_size for t in p):
                raise bad_request(f"prompt: token lists must be non-empty, with ids in "
                                  f"[0, {state.engine.vocab_size})", "prompt")
            ids.append(list(p))
            texts.append(state.tokenizer.decode(p))
    return ids, texts


# ---------------------------------------------------------------------------------------------- engine -> output
async def _deltas(job: Job):
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
        for h in job.handles:
            h.cancel()
        for t in tasks:
            t.cancel()


async def _results(request: HTTPRequest, job: Job) -> list[Result]:
    """Wait for every choice; a client that disconnects meanwhile cancels them."""
    deltas: list[list[Delta]] = [[] for _ in job.handles]

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for h in job.handles:
            h.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for k, delta in _deltas(job):
            if k is not None:
                deltas[k].append(delta)
    finally:
        watcher.cancel()
    return [Result.merge(d) for d in deltas]


def _finish(state, job: Job, k: int, delta: Delta) -> None:
    if delta.finish_reason in ("stop", "length"):
        state.metrics.observe_generation(delta.usage, delta.finish_reason, job.arrival, job.first_token.get(k),
                                         time.monotonic())


def _usage(job: Job, usages: list) -> dict:
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


def _engine_failure(delta: Delta) -> APIError:
    message = delta.error or "the request was aborted because the server is shutting down"
    return APIError(500 if delta.finish_reason == "error" else 503, message, code="engine_error")


def _post(state, text: str) -> str:
    for plugin in state.plugins:
        if hasattr(plugin, "post_process"):
            text = plugin.post_process(text)
    return text


def _token_text(state, token_id: int) -> str:
    return state.tokenizer.decode([token_id])


def _chat_logprobs(state, logprobs: list[TokenLogprob] | None) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id, lp):
        s = _token_text(state, token_id)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

    return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                        for e in logprobs], "refusal": None}


def _legacy_logprobs(state, pairs: list[tuple[int, TokenLogprob | None]], offset: int = 0) -> dict:
    """The legacy completions logprobs object over (token id, logprob entry or None) pairs."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in pairs:
        s = _token_text(state, token_id)
        out["tokens"].append(s)
        out["token_logprobs"].append(None if entry is None else entry.logprob)
        out["top_logprobs"].append(None if entry is None else {_token_text(state, t): lp for t, lp in entry.top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------- chat
async def chat_completions(state, request: HTTPRequest, body: ChatCompletionRequest):
    _check_model(state, body.model)
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_request(f"response_format {body.response_format.get('type')!r} is not supported: this server "
                          "cannot constrain output to JSON", "response_format")
    if body.tools and body.tool_choice != "none":
        raise bad_request("tools are not supported: this model has no tool calling", "tools")
    prompt = chat_prompt(state, body)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested == 0:
        raise bad_request("max_tokens must be at least 1", "max_tokens")
    max_new = _max_new(state, body, len(prompt), requested, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    requests = [Request(prompt, _sampling(state, body, max_new, k), _stops(body), logprobs=top,
                        ignore_eos=body.ignore_eos) for k in range(body.n)]
    job = Job(_submit(state, requests, "messages"), [0] * body.n)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(_chat_stream(state, body, job, rid, created), media_type="text/event-stream")
    results = await _results(request, job)
    for k, r in enumerate(results):
        if r.finish_reason not in ("stop", "length"):
            raise _engine_failure(Delta(finish_reason=r.finish_reason, error=r.error))
        _finish(state, job, k, Delta(finish_reason=r.finish_reason, usage=r.usage))
    choices = [{"index": k, "message": {"role": "assistant", "content": _post(state, r.text), "refusal": None},
                "logprobs": _chat_logprobs(state, r.logprobs) if top is not None else None,
                "finish_reason": r.finish_reason} for k, r in enumerate(results)]
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                         "system_fingerprint": FINGERPRINT, "choices": choices,
                         "usage": _usage(job, [r.usage for r in results])})


async def _chat_stream(state, body, job: Job, rid: str, created: int):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    want_logprobs = bool(body.logprobs)

    def chunk(choices, usage=None):
        payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                   "system_fingerprint": FINGERPRINT, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return _sse(payload)

    yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for k in range(len(job.handles))])
    usages = [None] * len(job.handles)
    async for k, delta in _deltas(job):
        if k is None:
            yield ": keep-alive\n\n"
            continue
        if delta.finish_reason in ("error", "abort"):
            yield _sse(_engine_failure(delta).body())
            return
        text = _post(state, delta.text) if delta.text else ""
        if text or (want_logprobs and delta.logprobs):
            logprobs = _chat_logprobs(state, delta.logprobs) if want_logprobs else None
            yield chunk([{"index": k, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}])
        if delta.finish_reason is not None:
            usages[k] = delta.usage
            _finish(state, job, k, delta)
            yield chunk([{"index": k, "delta": {}, "logprobs": None, "finish_reason": delta.finish_reason}])
    if include_usage:
        yield chunk([], _usage(job, usages))
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------- completions
async def completions(state, request: HTTPRequest, body: CompletionRequest):
    _check_model(state, body.model)
    if body.suffix:
        raise bad_request("suffix (fill-in-the-middle) is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported (it must equal n)", "best_of")
    prompts, texts = _completion_prompts(state, body)
    requested = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
    score_only = requested == 0  # echo + max_tokens=0: score the prompt, generate nothing
    if score_only and not body.echo:
        raise bad_request("max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
    k_lp, requests, prompt_of = body.logprobs, [], []
    for p, ids in enumerate(prompts):
        max_new = _max_new(state, body, len(ids), max(1, requested), "prompt")
        for j in range(body.n):
            requests.append(Request(ids, _sampling(state, body, max_new, j), _stops(body), logprobs=k_lp,
                                    prompt_logprobs=k_lp if body.echo and k_lp is not None else None,
                                    ignore_eos=body.ignore_eos))
            prompt_of.append(p)
    job = Job(_submit(state, requests, "prompt"), prompt_of)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(_completion_stream(state, body, job, texts, rid, created),
                                 media_type="text/event-stream")
    results = await _results(request, job)
    choices = []
    for k, r in enumerate(results):
        if r.finish_reason not in ("stop", "length"):
            raise _engine_failure(Delta(finish_reason=r.finish_reason, error=r.error))
        _finish(state, job, k, Delta(finish_reason=r.finish_reason, usage=r.usage))
        prompt_ids, prompt_text = prompts[prompt_of[k]], texts[prompt_of[k]]
        gen_ids, gen_lp, text = r.token_ids, r.logprobs or [], _post(state, r.text)
        if score_only:
            gen_ids, gen_lp, text = [], [], ""
            r.usage.completion_tokens = 0
        logprobs = None
        if k_lp is not None:
            pairs = list(zip(gen_ids, gen_lp))
            if body.echo:
                pairs = list(zip(prompt_ids, r.prompt_logprobs)) + pairs
            logprobs = _legacy_logprobs(state, pairs)
        choices.append({"index": k, "text": (prompt_text if body.echo else "") + text, "logprobs": logprobs,
                        "finish_reason": r.finish_reason})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                         "system_fingerprint": FINGERPRINT, "choices": choices,
                         "usage": _usage(job, [r.usage for r in results])})


async def _completion_stream(state, body, job: Job, texts: list[str], rid: str, created: int):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, usage=None):
        payload = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                   "system_fingerprint": FINGERPRINT, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return _sse(payload)

    if body.echo:
        yield chunk([{"index": k, "text": texts[job.prompt_of[k]], "logprobs": None, "finish_reason": None}
                     for k in range(len(job.handles))])
    usages = [None] * len(job.handles)
    async for k, delta in _deltas(job):
        if k is None:
            yield ": keep-alive\n\n"
            continue
        if delta.finish_reason in ("error", "abort"):
            yield _sse(_engine_failure(delta).body())
            return
        text = _post(state, delta.text) if delta.text else ""
        logprobs = None
        if body.logprobs is not None and delta.logprobs:
            logprobs = _legacy_logprobs(state, [(e.token_id, e) for e in delta.logprobs])
        if text or logprobs or delta.finish_reason is not None:
            yield chunk([{"index": k, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}])
        if delta.finish_reason is not None:
            usages[k] = delta.usage
            _finish(state, job, k, delta)
    if include_usage:
        yield chunk([], _usage(job, usages))
    yield "data: [DONE]\n\n"
