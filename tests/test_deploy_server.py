"""The server under an orchestrator (issue 23, item 2): /ready after the warm-up, SIGTERM drains in-flight streams
and exits 0, JSON log lines carry the request id, --workers above 1 is refused with the reason, API keys from a
secret file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace

import httpx
import pytest

from dsv3.server import build_app
from dsv3.server.cli import resolve_options
from server_utils import MODEL_NAME, ServerThread, free_port, model_dir, server_options  # noqa: F401 (a fixture)
from test_cli import dsv3_env

STREAM = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    """Poll `url`/ready until it answers 200; fail with the server's output if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def start_server(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    """`dsv3 serve` on the tiny model and a free port, in a child process, once /ready answers: (process, url)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", str(model_dir), "--port", str(port),
                             "--served-model-name", MODEL_NAME, "--max-seq-len", "256", "--max-batch", "4",
                             "--threads", "1", *flags], env=dsv3_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url)
    return proc, url


def test_ready_only_after_the_warm_up_while_health_answers_at_once(model_dir, monkeypatch):
    app = build_app(server_options(model_dir, api_key=[]))
    engine, release = app.state.dsv3.engine, threading.Event()
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (release.wait(10), step()))  # the warm-up's first step waits
    server = ServerThread(app)
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 503 and r.json()["error"]["message"] == "not ready: warming up"
        assert r.headers["retry-after"] == "1"
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.02)
        assert httpx.get(server.url + "/ready").json() == {"status": "ready"}
    finally:
        server.stop()


def test_sigterm_drains_four_streams_refuses_new_requests_and_exits_0(model_dir, tmp_path):
    """Acceptance: 4 streams in flight, SIGTERM -> /ready 503 at once, a new request 503 + Retry-After, all 4
    streams complete, exit 0 within the grace period; the JSON log lines carry the request ids."""
    grace = 20
    proc, url = start_server(model_dir, "--log-format", "json", "--drain-timeout", str(grace))
    try:
        streaming, last_lines = threading.Barrier(5, timeout=30), [None] * 4

        def stream(i):
            with httpx.stream("POST", url + "/v1/completions", json=STREAM, timeout=60,
                              headers={"x-request-id": f"stream-{i}"}) as r:
                lines = (line for line in r.iter_lines() if line)
                next(lines)  # the first chunk: this stream is in flight
                streaming.wait()
                last_lines[i] = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"][-1]

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        streaming.wait()
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        ready = httpx.get(url + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]["message"] == "not ready: draining"
        refused = httpx.post(url + "/v1/completions", json={**STREAM, "stream": False})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "shutting_down"
        assert any(t.is_alive() for t in threads), "the streams ended before the drain was observed"
        for t in threads:
            t.join(60)
        assert [line["choices"][0]["finish_reason"] for line in last_lines] == ["length"] * 4
        _, stderr = proc.communicate(timeout=grace)
        assert proc.returncode == 0 and time.monotonic() - sent < grace, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    records = [json.loads(line) for line in stderr.splitlines()]
    access = {r["request_id"]: r["message"] for r in records if r["logger"] == "uvicorn.access"}
    assert all('"POST /v1/completions HTTP/1.1" 200' in access[f"stream-{i}"] for i in range(4))
    assert any(r["message"].startswith("SIGTERM: draining 4 request(s)") for r in records)


def test_a_stream_that_outlasts_the_drain_ends_with_an_error_event_and_the_server_exits_0(model_dir):
    proc, url = start_server(model_dir, "--drain-timeout", "0.2")
    try:
        with httpx.stream("POST", url + "/v1/completions", json=STREAM, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            next(lines)
            proc.send_signal(signal.SIGTERM)
            last = list(lines)[-1]
        assert json.loads(last[6:])["error"]["message"] == ("the request was aborted because the server is "
                                                            "shutting down")
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "drain: grace period over, 1 request(s) aborted" in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("argv, start, end", [
    (["--workers", "2"], "--workers 2: one dsv3 serve process runs one engine", "(a Kubernetes Service: "
     "docs/deploy.md)"),
    (["--workers", "0"], "--workers 0: expected 1", "expected 1"),
    (["--drain-timeout", "0"], "--drain-timeout 0.0: expected a positive", "number of seconds"),
])
def test_bad_orchestration_flags_are_one_line(argv, start, end):
    result = subprocess.run([sys.executable, "-m", "dsv3", "serve", *argv], env=dsv3_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(start) and result.stderr.endswith(end + "\n")


def test_api_keys_come_from_the_file_dsv3_api_key_file(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# one key a line\nsk-one\n\n  sk-two  \n")
    monkeypatch.setenv("DSV3_API_KEY", "sk-env")
    monkeypatch.setenv("DSV3_API_KEY_FILE", str(keys))
    options = resolve_options(Namespace(api_key=["sk-flag"]))
    assert options["api_key"] == ["sk-flag", "sk-env", "sk-one", "sk-two"]
    monkeypatch.setenv("DSV3_API_KEY_FILE", str(tmp_path / "absent"))
    with pytest.raises(SystemExit, match=r"^DSV3_API_KEY_FILE=\S+absent: cannot read it \(No such file or directory"):
        resolve_options(Namespace())
