"""`POST /v1/completions` (the legacy API), as lm-eval's `local-completions` uses it.

`prompt` may be a string, a list of strings, a list of token ids or a list of such lists; choices are numbered
prompt-major (prompt p, choice j -> index p·n + j), which lm-eval relies on when it sorts by index. With `echo` and
`logprobs` the response carries the log-probability of every prompt token (the first is null) followed by the
generated ones, in the legacy shape {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}:
lm-eval sums the continuation's part of it. `max_tokens: 0` with `echo` scores the prompt without generating.

A request holds at most `max_prompts` prompts of at most `max_request_tokens` tokens together (ServerSettings);
they are tokenised, and the response built, in a worker thread.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from ..engine import Delta, Request, TokenLogprob
from .common import (FINGERPRINT, Job, check_logprob_values, check_model, check_text_fits, collect_results,
                     engine_failure, json_response, max_new_tokens, observe_finish, post_process, sampling_params,
                     stop_strings, stream_choices, stream_chunk, submit, token_text, usage_body)
from .errors import bad_request
from .schemas import CompletionRequest

def _completion_prompts(state, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """`prompt` in any of its four forms -> (token ids, text) per prompt, within the request's limits."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    limits = state.settings
    if len(prompt) > limits.max_prompts:
        raise bad_request(f"prompt: {len(prompt)} prompts in one request; this server takes at most "
                          f"{limits.max_prompts}", "prompt")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            check_text_fits(state, len(p), "prompt")
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
    total = sum(map(len, ids))
    if total > limits.max_request_tokens:
        raise bad_request(f"prompt: {total} prompt tokens in one request; this server takes at most "
                          f"{limits.max_request_tokens}", "prompt")
    return ids, texts


def _legacy_logprobs(state, pairs: list[tuple[int, TokenLogprob | None]], offset: int = 0) -> dict:
    """The legacy completions logprobs object over (token id, logprob entry or None) pairs."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in pairs:
        s = token_text(state, token_id)
        out["tokens"].append(s)
        out["token_logprobs"].append(None if entry is None else entry.logprob)
        out["top_logprobs"].append(None if entry is None else {token_text(state, t): lp for t, lp in entry.top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


# ---------------------------------------------------------------------------------------------- completions
async def completions(state, request: HTTPRequest, body: CompletionRequest, cache_salt: str | None):
    check_model(state, body.model)
    if body.suffix:
        raise bad_request("suffix (fill-in-the-middle) is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported (it must equal n)", "best_of")
    prompts, texts = await run_in_threadpool(_completion_prompts, state, body)
    requested = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
    score_only = requested == 0  # echo + max_tokens=0: score the prompt, generate nothing
    if score_only and not body.echo:
        raise bad_request("max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
    k_lp, requests, prompt_of, values = body.logprobs, [], [], 0
    for p, ids in enumerate(prompts):
        max_new = max_new_tokens(state, body, len(ids), max(1, requested), "prompt")
        values += body.n * (max_new + (len(ids) if body.echo else 0)) * ((k_lp or 0) + 1)
        for j in range(body.n):
            requests.append(Request(ids, sampling_params(state, body, max_new, j), stop_strings(body), logprobs=k_lp,
                                    prompt_logprobs=k_lp if body.echo and k_lp is not None else None,
                                    ignore_eos=body.ignore_eos, cache_salt=cache_salt))
            prompt_of.append(p)
    if k_lp is not None:
        check_logprob_values(state, values, "logprobs")
    job = Job(submit(state, requests, "prompt"), prompt_of)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(_completion_stream(state, body, job, texts, rid, created),
                                 media_type="text/event-stream",
                                 background=BackgroundTask(job.cancel))
    results = await collect_results(request, job)
    for k, r in enumerate(results):
        if r.finish_reason not in ("stop", "length"):
            raise engine_failure(Delta(finish_reason=r.finish_reason, error=r.error))
        observe_finish(state, job, k, Delta(finish_reason=r.finish_reason, usage=r.usage))
        if score_only:
            r.usage.completion_tokens = 0

    def build():
        choices = []
        for k, r in enumerate(results):
            prompt_ids, prompt_text = prompts[prompt_of[k]], texts[prompt_of[k]]
            gen_ids, gen_lp, text = r.token_ids, r.logprobs or [], post_process(state, r.text)
            if score_only:
                gen_ids, gen_lp, text = [], [], ""
            logprobs = None
            if k_lp is not None:
                pairs = list(zip(gen_ids, gen_lp))
                if body.echo:
                    pairs = list(zip(prompt_ids, r.prompt_logprobs)) + pairs
                logprobs = _legacy_logprobs(state, pairs)
            choices.append({"index": k, "text": (prompt_text if body.echo else "") + text, "logprobs": logprobs,
                            "finish_reason": r.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                "system_fingerprint": FINGERPRINT, "choices": choices,
                "usage": usage_body(job, [r.usage for r in results])}

    return await json_response(build)


async def _completion_stream(state, body, job: Job, texts: list[str], rid: str, created: int):
    chunk, include_usage = stream_chunk(state, body, rid, created, "text_completion")
    if body.echo:
        yield chunk([{"index": k, "text": texts[job.prompt_of[k]], "logprobs": None, "finish_reason": None}
                     for k in range(len(job.handles))])

    def render(k, delta, text):
        logprobs = None
        if body.logprobs is not None and delta.logprobs:
            logprobs = _legacy_logprobs(state, [(e.token_id, e) for e in delta.logprobs])
        if text or logprobs or delta.finish_reason is not None:
            yield chunk([{"index": k, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}])

    async for event in stream_choices(state, job, chunk, include_usage, render):
        yield event
