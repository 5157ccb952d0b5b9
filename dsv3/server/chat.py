"""`POST /v1/chat/completions`: messages -> the chat template -> the engine -> a ChatCompletion or an SSE stream.

Stream shape (docs/openai-api.md §1.5): every chunk has the same id; the first delta carries
`role: assistant`; content deltas follow; a `delta: {}` chunk carries finish_reason; with
`stream_options.include_usage` every chunk has `usage: null` and one last chunk has `choices: []` and the usage;
`data: [DONE]` ends it. `: keep-alive` comments are sent while nothing is produced, and a failure mid-stream is a
`data: {"error": ...}` event. What the model cannot honour gets a 400 that says so: image parts (but for a
vision-language model: dsv3/server/images.py), audio and file parts, JSON response formats, tools and
tool_choice (other than "none"). The chat template is rendered and tokenised in a worker thread, as the response
is built, so a large request does not stall the event loop.
"""

from __future__ import annotations

import time
import uuid

import torch
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from ..engine import Delta, Request, TokenLogprob
from .common import (FINGERPRINT, Job, check_logprob_values, check_model, check_text_fits, collect_results,
                     engine_failure, json_response, max_new_tokens, observe_finish, post_process, sampling_params,
                     stop_strings, stream_choices, stream_chunk, submit, token_text, usage_body)
from .errors import bad_request
from .images import embed_prompt, flatten
from .schemas import ChatCompletionRequest

_NON_TEXT_PARTS = ("image_url", "input_image", "image", "input_audio", "audio", "file", "video_url")


def chat_prompt(state, body: ChatCompletionRequest) -> tuple[list[int], torch.Tensor | None]:
    """Messages -> the chat template's token ids (with the assistant prompt), after the plugins' pre_process, and
    for a vision-language model with images the prefill's inputs_embeds [T, D] (dsv3/server/images.py)."""
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
        elif isinstance(m.content, str) or state.vision is not None:  # parts: images.flatten reads them below
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
    images = []
    if state.vision is not None:
        messages, images = flatten([(m["role"], m["content"]) for m in messages], state.vision, state.image_limits)
    for plugin in state.plugins:
        if hasattr(plugin, "pre_process"):
            messages = plugin.pre_process(messages)
    check_text_fits(state, sum(len(m["content"]) for m in messages), "messages")
    try:
        rendered = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # template rejections, unencodable text: the request's fault
        raise bad_request(f"messages could not be rendered with the chat template: {error}", "messages") from None
    if state.vision is None:
        return state.tokenizer.encode(rendered, add_special_tokens=False), None
    return embed_prompt(state.vision, state.tokenizer, rendered, images)


def _chat_logprobs(state, logprobs: list[TokenLogprob] | None) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id, lp):
        s = token_text(state, token_id)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

    return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                        for e in logprobs], "refusal": None}


# ---------------------------------------------------------------------------------------------- chat
async def chat_completions(state, request: HTTPRequest, body: ChatCompletionRequest, cache_salt: str | None):
    check_model(state, body.model)
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_request(f"response_format {body.response_format.get('type')!r} is not supported: this server "
                          "cannot constrain output to JSON", "response_format")
    if body.tools:
        raise bad_request("tools are not supported by this model", "tools")
    if body.tool_choice not in (None, "none"):
        raise bad_request("tool_choice is not supported: this model has no tool calling", "tool_choice")
    prompt, embeds = await run_in_threadpool(chat_prompt, state, body)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested == 0:
        raise bad_request("max_tokens must be at least 1", "max_tokens")
    max_new = max_new_tokens(state, body, len(prompt), requested, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    if top is not None:
        check_logprob_values(state, body.n * max_new * (top + 1), "top_logprobs")
    requests = [Request(prompt, sampling_params(state, body, max_new, k), stop_strings(body), logprobs=top,
                        ignore_eos=body.ignore_eos, cache_salt=cache_salt, inputs_embeds=embeds)
                for k in range(body.n)]
    job = Job(submit(state, requests, "messages"), [0] * body.n)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(_chat_stream(state, body, job, rid, created), media_type="text/event-stream",
                                 background=BackgroundTask(job.cancel))
    results = await collect_results(request, job)
    for k, r in enumerate(results):
        if r.finish_reason not in ("stop", "length"):
            raise engine_failure(Delta(finish_reason=r.finish_reason, error=r.error))
        observe_finish(state, job, k, Delta(finish_reason=r.finish_reason, usage=r.usage))

    def build():
        choices = [{"index": k,
                    "message": {"role": "assistant", "content": post_process(state, r.text), "refusal": None},
                    "logprobs": _chat_logprobs(state, r.logprobs) if top is not None else None,
                    "finish_reason": r.finish_reason} for k, r in enumerate(results)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                "system_fingerprint": FINGERPRINT, "choices": choices,
                "usage": usage_body(job, [r.usage for r in results])}

    return await json_response(build)


async def _chat_stream(state, body, job: Job, rid: str, created: int):
    chunk, include_usage = stream_chunk(state, body, rid, created, "chat.completion.chunk")
    want_logprobs = bool(body.logprobs)
    yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for k in range(len(job.handles))])

    def render(k, delta, text):
        if text or (want_logprobs and delta.logprobs):
            logprobs = _chat_logprobs(state, delta.logprobs) if want_logprobs else None
            yield chunk([{"index": k, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}])
        if delta.finish_reason is not None:
            yield chunk([{"index": k, "delta": {}, "logprobs": None, "finish_reason": delta.finish_reason}])

    async for event in stream_choices(state, job, chunk, include_usage, render):
        yield event
