"""The OpenAI-compatible server, driven by the clients users have: the openai SDK (sync, async, streaming),
LangChain's ChatOpenAI and lm-eval's local-completions, plus errors, security, metrics and malformed input."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

from dsv3.cli import main as dsv3_main
from dsv3.plugins import RedactEmails
from dsv3.server import build_app, create_token

from server_utils import KEY, MODEL_NAME, ServerThread, model_dir  # noqa: F401 (a fixture)
from server_utils import server_options as options

USER = [{"role": "user", "content": "Tell me about the cat."}]


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerThread(build_app(options(model_dir, rate_limit=10_000)))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def engine_of(server):
    return server.app.state.dsv3.engine


def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (engine.num_running or engine.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- shapes
def test_models_health_metrics_and_request_ids(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).owned_by == "dsv3"
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("no-such-model")
    assert error.value.code == "model_not_found"
    for path in ("/health", "/metrics", "/v1/models", "/nope"):  # public, public, 401 without a key, 404
        response = httpx.get(server.url + path)
        assert response.status_code == {"/health": 200, "/metrics": 200, "/v1/models": 401, "/nope": 404}[path]
        assert len(response.headers["x-request-id"]) >= 16
    echoed = httpx.get(server.url + "/health", headers={"x-request-id": "my-trace-1"})
    assert echoed.headers["x-request-id"] == "my-trace-1"


def test_chat_completion_non_streaming(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_completion_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2, n=2, seed=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r._request_id
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: both choices agree
    assert len(r.choices[0].logprobs.content) == 5 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    assert r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # content as a list of text parts, a null assistant content, a developer message; extra fields ignored
    r2 = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=3, temperature=0,
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                  {"role": "user", "content": [{"type": "text", "text": "again"}]}],
        extra_body={"top_k": 5, "some_unknown_field": {"x": 1}}, stop=["\n\n"], presence_penalty=0.5, user="u1")
    assert r2.usage.completion_tokens <= 3


def test_chat_streaming_matches_non_streaming(client):
    args = dict(model=MODEL_NAME, messages=USER, max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens is not None


def test_async_client(server):
    async def go():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        r = await client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4, temperature=0)
        stream = await client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4,
                                                      temperature=0, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return r.choices[0].message.content, text

    plain, streamed = asyncio.run(go())
    assert plain == streamed and plain


def test_legacy_completions(client):
    r = client.completions.create(model=MODEL_NAME, prompt=[[0, 500, 600], [0, 700]], max_tokens=3, n=2,
                                  temperature=0, logprobs=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.choices[0].text == r.choices[1].text
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    assert len(r.choices[0].logprobs.token_logprobs) == 3
    scored = client.completions.create(model=MODEL_NAME, prompt="the cat sat", max_tokens=0, echo=True,
                                       logprobs=1, temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "the cat sat" and lp.token_logprobs[0] is None
    assert len(lp.tokens) == scored.usage.prompt_tokens and all(x < 0 for x in lp.token_logprobs[1:])
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt="the cat sat", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert text == client.completions.create(model=MODEL_NAME, prompt="the cat sat", max_tokens=4,
                                             temperature=0).choices[0].text


def test_multi_turn_chat_reports_cached_tokens(client):
    messages = [{"role": "system", "content": "You are a helpful assistant who knows about cats. " * 6},
                {"role": "user", "content": "Hello!"}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 16 and cached % 16 == 0
    assert second.usage.prompt_cache_hit_tokens == cached
    assert second.usage.prompt_cache_miss_tokens == second.usage.prompt_tokens - cached


# ---------------------------------------------------------------------------------------------- errors
def test_bad_requests_are_400_in_openai_shape(server, client):
    cases = [
        (dict(messages=[]), None),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), None),
        (dict(messages=USER, temperature=5), None),  # FastAPI's 422 becomes 400
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), None),
        (dict(messages=[{"role": "user", "content": "hi " * 300}], max_tokens=10), "context_length_exceeded"),
        (dict(messages=USER, max_tokens=300), "context_length_exceeded"),
    ]
    for kwargs, code in cases:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=MODEL_NAME, **kwargs)
        assert error.value.code == code and error.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="text-only"):
        client.chat.completions.create(model=MODEL_NAME, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])
    response = httpx.post(server.base_url + "/chat/completions", content=b"{not json",
                          headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert error.value.code == "model_not_found"
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    for kwargs, param in ((dict(tools=[tool]), "tools"), (dict(tool_choice="required"), "tool_choice")):
        with pytest.raises(openai.BadRequestError, match="not supported") as error:
            client.chat.completions.create(model=MODEL_NAME, messages=USER, **kwargs)
        assert error.value.param == param
    with pytest.raises(openai.BadRequestError, match="JSON"):
        client.chat.completions.create(model=MODEL_NAME, messages=USER, response_format={"type": "json_object"})


def test_authentication_and_signed_tokens(server, capsys):
    def call(key):
        c = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
        return c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=1)

    with pytest.raises(openai.AuthenticationError):
        call("wrong-key")
    assert call(create_token(KEY, 60)).usage.completion_tokens == 1
    with pytest.raises(openai.AuthenticationError):
        call(create_token(KEY, -5))  # expired
    good = create_token(KEY, 60)
    with pytest.raises(openai.AuthenticationError):
        call(good[:-1] + ("0" if good[-1] != "0" else "1"))  # tampered signature
    with pytest.raises(openai.AuthenticationError):
        call(good.replace(good.split(".")[2], str(int(good.split(".")[2]) + 3600)))  # extended expiry
    with pytest.raises(openai.AuthenticationError):
        call(create_token("another-key", 60))
    assert dsv3_main(["token", "create", "--api-key", KEY, "--expires-in", "120"]) == 0
    assert call(capsys.readouterr().out.strip()).usage.completion_tokens == 1


def test_rate_limit_queue_full_plugin_failure_and_allowlist(model_dir):
    strict = ServerThread(build_app(options(model_dir, rate_limit=2, rate_burst=2, plugin=["server_utils:Shout"],
                                            max_batch=1, max_waiting=1)))
    blocked = ServerThread(build_app(options(model_dir, allow_cidr=["10.0.0.0/8"])))
    try:
        c = openai.OpenAI(base_url=strict.base_url, api_key=KEY, max_retries=0)
        r = c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4, temperature=0)
        assert r.choices[0].message.content == r.choices[0].message.content.upper()  # post_process ran
        with pytest.raises(openai.InternalServerError) as error:
            c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "boom"}])
        assert "secret" not in str(error.value.body) and error.value.response.headers["x-request-id"] in str(
            error.value.body)
        with pytest.raises(openai.RateLimitError) as error:
            c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=1)
        assert int(error.value.response.headers["retry-after"]) >= 1
        time.sleep(1.1)
        # queue full: at most one choice running and one waiting; the third gets 503 with Retry-After
        body = dict(model=MODEL_NAME, messages=USER, max_tokens=100, ignore_eos=True, n=3)
        response = httpx.post(strict.base_url + "/chat/completions", json=body,
                              headers={"authorization": f"Bearer {KEY}"}, timeout=60)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        with pytest.raises(openai.PermissionDeniedError):
            openai.OpenAI(base_url=blocked.base_url, api_key=KEY, max_retries=0).models.list()
        assert httpx.get(blocked.url + "/health").status_code == 403
    finally:
        strict.stop()
        blocked.stop()


def test_example_plugin_redacts_emails(model_dir, server):
    plugin = RedactEmails()
    assert plugin.post_process("mail bob@example.com now") == "mail [email] now"
    assert plugin.pre_process([{"role": "user", "content": "a.b@c.org"}])[0]["content"] == "[email]"
    tokenizer = server.app.state.dsv3.tokenizer
    redacted = len(tokenizer.apply_chat_template([{"role": "user", "content": "write to [email]"}],
                                                 add_generation_prompt=True))
    with_plugin = ServerThread(build_app(options(model_dir, plugin=["dsv3.plugins:RedactEmails"])))
    try:
        c = openai.OpenAI(base_url=with_plugin.base_url, api_key=KEY, max_retries=0)
        r = c.chat.completions.create(model=MODEL_NAME, max_tokens=1,
                                      messages=[{"role": "user", "content": "write to someone.long@example.com"}])
        assert r.usage.prompt_tokens == redacted
    finally:
        with_plugin.stop()


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_count_requests_tokens_and_never_show_keys(server, client):
    client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    assert KEY not in text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["dsv3:prompt_tokens_total"] > 0 and samples["dsv3:generation_tokens_total"] >= 2
    assert samples["dsv3:time_to_first_token_seconds_count"] >= 1
    assert samples['dsv3:http_requests_total{endpoint="/v1/chat/completions",method="POST",status="200"}'] >= 1
    assert "dsv3:num_requests_running" in samples and "dsv3:num_requests_waiting" in samples
    assert samples["dsv3:prefix_cache_hits_tokens"] <= samples["dsv3:prefix_cache_queries_tokens"]


# ---------------------------------------------------------------------------------------------- concurrency
@pytest.fixture(scope="module")
def server64(model_dir):
    """float64 weights: batched and lone computations differ by rounding (other BLAS blockings, cached prefixes);
    in float32 that can flip a greedy choice between two near-equal logits of a random model."""
    srv = ServerThread(build_app(options(model_dir, rate_limit=10_000, max_batch=8, dtype="float64")))
    yield srv
    srv.stop()


def test_32_concurrent_streams_equal_lone_requests_and_cancellation_frees_everything(server64):
    server = server64
    prompts = [f"Request {i}: " + "tell me a story about a cat " * (i % 4 + 1) for i in range(32)]

    def body(i, max_tokens=6):
        return dict(model=MODEL_NAME, messages=[{"role": "user", "content": prompts[i]}], max_tokens=max_tokens,
                    temperature=0, extra_body={"ignore_eos": True})

    async def stream_text(client, i):
        stream = await client.chat.completions.create(**body(i), stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def cancelled(client, i):
        stream = await client.chat.completions.create(**body(i, max_tokens=200), stream=True)
        seen = 0
        async for chunk in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()

    async def go():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        alone = [(await client.chat.completions.create(**body(i))).choices[0].message.content for i in range(32)]
        together = await asyncio.gather(*(stream_text(client, i) for i in range(32)))
        await asyncio.gather(*(cancelled(client, i) for i in range(20)))
        return alone, together

    alone, together = asyncio.run(go())
    assert together == alone
    engine = engine_of(server)
    wait_idle(engine)
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert engine.prefix.referenced_blocks == 0  # every reference was returned


# ---------------------------------------------------------------------------------------------- LangChain
def test_langchain_chat_openai_invoke_and_stream_usage(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL_NAME, base_url=server.base_url, api_key=KEY, temperature=0, max_tokens=5,
                     max_retries=0)
    reply = llm.invoke("Tell me about the cat.")
    assert reply.content and reply.usage_metadata["output_tokens"] == 5
    assert reply.response_metadata["finish_reason"] == "length"
    assert "cache_read" in reply.usage_metadata["input_token_details"]
    chunks = list(ChatOpenAI(model=MODEL_NAME, base_url=server.base_url, api_key=KEY, temperature=0, max_tokens=5,
                             stream_usage=True, max_retries=0).stream("Tell me about the cat."))
    assert "".join(c.content for c in chunks) == reply.content
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert len(usage) == 1 and usage[0]["output_tokens"] == 5


# ---------------------------------------------------------------------------------------------- lm-eval
MMLU_QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Berlin", "Madrid", "Paris", "Rome"], "answer": 2},
    {"question": "Which gas do plants absorb from the air?", "choices": ["Oxygen", "Carbon dioxide", "Helium",
                                                                        "Neon"], "answer": 1},
    {"question": "How many legs does a spider have?", "choices": ["Six", "Eight", "Ten", "Four"], "answer": 1},
]
TASK_YAML = """task: tiny_mmlu
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\n\\
  C. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_loglikelihoods_match_the_model(server, model_dir, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in MMLU_QUESTIONS))
    (tmp_path / "tiny_mmlu.yaml").write_text(TASK_YAML.format(data=data))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={MODEL_NAME},base_url={server.base_url}/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={model_dir},num_concurrent=1,max_retries=1",
        tasks=["tiny_mmlu"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True)
    assert 0 <= out["results"]["tiny_mmlu"]["acc,none"] <= 1
    # each answer's log-likelihood equals the model's own, computed directly
    from dsv3 import load_pretrained
    from dsv3.tokenizer import Tokenizer

    model, tokenizer = load_pretrained(model_dir).eval(), Tokenizer.from_pretrained(model_dir)
    sample = out["samples"]["tiny_mmlu"][0]
    context, continuation = sample["arguments"][0]  # choice "A"; lm-eval's API models add no bos token
    assert context.endswith("?\nA. Berlin\nB. Madrid\nC. Paris\nD. Rome\nAnswer:") and continuation == " A"
    ctx = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    with torch.no_grad():
        logp = model(torch.tensor([whole]))[0].float().log_softmax(-1)
    expected = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
    assert sample["resps"][0][0][0] == pytest.approx(expected, abs=1e-3)


# ---------------------------------------------------------------------------------------------- malformed input
def _bad_bodies():
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=10)
    chat_fields = ["model", "messages", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids", "seed",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
                   "top_logprobs", "stream", "stream_options", "response_format", "tools", "user"]
    completion_fields = ["model", "prompt", "echo", "logprobs", "suffix", "best_of", "stop", "n", "temperature",
                         "logit_bias", "seed", "stream", "stop_token_ids"]
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                     "content": json_values})

    @st.composite
    def bodies(draw):
        chat = draw(st.booleans())
        body = ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]} if chat
                else {"model": MODEL_NAME, "prompt": "hi"})
        body["max_tokens"] = 2  # generation stays short whatever else is drawn
        fields = chat_fields if chat else completion_fields
        for _ in range(draw(st.integers(1, 3))):
            action = draw(st.sampled_from(["set", "delete", "messages", "whole"]))
            if action == "set":
                body[draw(st.sampled_from(fields))] = draw(json_values)
            elif action == "delete":
                body.pop(draw(st.sampled_from(fields)), None)
            elif action == "messages" and chat:
                body["messages"] = draw(st.lists(message, max_size=3))
            elif action == "whole":
                return "/chat/completions" if chat else "/completions", draw(json_values)
        return "/chat/completions" if chat else "/completions", body

    return bodies()


def test_generated_bad_requests_never_cause_5xx(server):
    from hypothesis import HealthCheck, given, settings

    http = httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    statuses = []

    @settings(max_examples=220, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_bad_bodies())
    def check(case):
        path, body = case
        response = http.post(path, content=json.dumps(body).encode())
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert len(statuses) >= 200 and sum(s == 400 for s in statuses) >= 100


# ---------------------------------------------------------------------------------------------- TLS
def test_tls_requires_version_1_3(model_dir, tmp_path):
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    srv = ServerThread(build_app(options(model_dir)), ssl_certfile=str(cert), ssl_keyfile=str(key))
    try:
        modern = ssl.create_default_context(cafile=str(cert))
        c = openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, http_client=httpx.Client(verify=modern))
        assert c.models.list().data[0].id == MODEL_NAME
        old = ssl.create_default_context(cafile=str(cert))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", verify=old)
    finally:
        srv.stop()


def test_failure_mid_stream_ends_with_an_error_event(server, client, monkeypatch):
    engine = engine_of(server)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=50, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # the role chunk: the request is in the engine

    def broken():
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine, "_decode", broken)
    with pytest.raises(openai.APIError, match="engine failed"):
        for _ in chunks:
            pass
    monkeypatch.undo()
    assert client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2).choices  # still serving


def test_client_that_goes_away_cancels_a_non_streaming_request(server):
    engine, registry = engine_of(server), server.app.state.dsv3.metrics.registry
    finished_before = registry.get_sample_value("dsv3:generation_tokens_total")
    body = dict(model=MODEL_NAME, messages=USER, max_tokens=200, temperature=0, ignore_eos=True, n=2)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(5, read=0.3))
    wait_idle(engine, timeout=10)
    assert engine.num_running == 0 and engine.prefix.referenced_blocks == 0
    # aborted, not run to max_tokens: finished generations add their tokens, aborted ones do not
    assert registry.get_sample_value("dsv3:generation_tokens_total") == finished_before


def test_config_file_then_command_line(tmp_path, monkeypatch):
    from dsv3.cli import build_parser
    from dsv3.server.cli import resolve_options

    (tmp_path / "serve.toml").write_text('port = 9001\nmax-batch = 4\napi_key = ["from-file"]\n'
                                         'allow_cidr = ["127.0.0.0/8"]\n')
    monkeypatch.setenv("DSV3_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--config", str(tmp_path / "serve.toml"), "--max-batch", "16"])
    options = resolve_options(args)
    assert options["port"] == 9001 and options["max_batch"] == 16 and options["host"] == "127.0.0.1"
    assert options["api_key"] == ["from-file", "from-env"] and options["allow_cidr"] == ["127.0.0.0/8"]
    (tmp_path / "bad.json").write_text('{"max_batchh": 3}')
    with pytest.raises(SystemExit, match="unknown option 'max_batchh'"):
        resolve_options(build_parser().parse_args(["serve", "--config", str(tmp_path / "bad.json")]))


def test_compile_flag_and_config_key_reach_the_engine(model_dir, tmp_path, monkeypatch):
    from dsv3.cli import build_parser
    from dsv3.engine import Engine
    from dsv3.server.cli import compiled_by_default, resolve_options

    def parsed(*argv):
        return resolve_options(build_parser().parse_args(["serve", *argv]))["compile"]

    (tmp_path / "compile.json").write_text('{"compile": true}')
    assert parsed() is None and parsed("--compile") is True and parsed("--eager") is False
    assert parsed("--config", str(tmp_path / "compile.json")) is True
    assert parsed("--config", str(tmp_path / "compile.json"), "--eager") is False
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --compile
        build_parser().parse_args(["serve", "--compile", "--eager"])
    # the default: compiled on a GPU (CUDA graphs, as vLLM), eager on a CPU; an explicit choice wins on both
    assert [compiled_by_default(None, "cuda"), compiled_by_default(None, "cpu")] == [True, False]
    assert [compiled_by_default(False, "cuda"), compiled_by_default(True, "cpu")] == [False, True]
    warmed = []  # the compiled step itself is tested in test_engine.py; here: the option compiles at startup
    monkeypatch.setattr(Engine, "warmup", lambda self: warmed.append(self.config.compile))
    build_app(options(model_dir, compile=True))
    build_app(options(model_dir))  # the default on this CPU: eager, no warm-up
    assert warmed == [True]
    with pytest.raises(SystemExit, match="EngineConfig.compile must be true or false, got 'yes'"):
        build_app(options(model_dir, compile="yes"))
    with pytest.raises(SystemExit, match="EngineConfig.compile_max_batch must be an integer >= 1, got 0"):
        build_app(options(model_dir, compile_max_batch=0))


def test_keep_alive_comments_while_nothing_is_produced(server, monkeypatch):
    from dsv3.server import common

    engine = engine_of(server)
    real_step = engine.step

    def slow_step():
        time.sleep(0.15)
        real_step()

    monkeypatch.setattr(common, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(engine, "step", slow_step)
    body = dict(model=MODEL_NAME, messages=USER, max_tokens=2, stream=True)
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body,
                      headers={"authorization": f"Bearer {KEY}"}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_token_bucket_refills_and_forgets_idle_callers():
    from dsv3.server.security import RateLimiter

    limiter = RateLimiter(rate=2, burst=2)
    assert [limiter.check("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert limiter.check("a", now=0.5) == 0.0 and limiter.check("a", now=0.5) > 0
    limiter.MAX_CALLERS = 3
    for i in range(5):
        limiter.check(f"ip{i}", now=10.0)
    limiter.check("late", now=20.0)  # everyone else has refilled by now: their buckets are dropped
    assert set(limiter._buckets) == {"late"}
