"""Helpers for the engine and server tests: a tiny random model directory and a real uvicorn server in a thread."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn

import dsv3
from dsv3 import ModelConfig, Transformer, save_pretrained
from dsv3.server.cli import DEFAULTS, uvicorn_config

BUNDLED = Path(dsv3.__file__).parent / "bundled"
MODEL_NAME = "tiny-test"
KEY = "sk-test-key-123"


def server_options(model_dir, **overrides) -> dict:
    """`dsv3 serve` options for a test server on `model_dir` (build_app's input), with one API key."""
    return {**DEFAULTS, "model": str(model_dir), "served_model_name": MODEL_NAME, "api_key": [KEY],
            "max_seq_len": 256, "max_batch": 8, "block_size": 16, **overrides}


# The least that still has a dense layer, an MoE layer, group-limited routing and more than K experts: for the tests
# that torch.compile a model, whose time on a 2-core CPU (~1-2 minutes a graph, cold) grows with the layers traced.
COMPILE_SIZED = dict(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                     n_group=2, topk_group=1, num_nextn_predict_layers=0)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny random model on the bundled tokenizer's vocabulary (config fields as overrides). initializer_range=0.1
    spreads the logits, so greedy choices are not near-ties that float rounding between batch shapes could flip."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig.tiny(**{"vocab_size": 8192, "initializer_range": 0.1, **overrides})).eval()


def run_engine(engine, requests: list) -> list:
    """Submit every request, step the engine until idle (no engine thread), collect the Results."""
    from dsv3.engine import Result

    handles = [engine.submit(r) for r in requests]
    while engine.scheduler.has_work():
        engine.step()
    return [Result.of(h) for h in handles]


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """Save a tiny model beside a copy of the bundled tokenizer files (the layout `dsv3 serve --model` reads)."""
    path.mkdir(parents=True, exist_ok=True)
    save_pretrained(tiny_model(seed), path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED / name, path / name)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model directory per test module (imported as a fixture); one torch thread, as the server and its
    clients share the CPU."""
    torch.set_num_threads(1)
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread; `base_url` ends in /v1."""

    def __init__(self, app, **config) -> None:
        self.port = free_port()
        self.app = app
        config = {"log_level": "warning", "timeout_graceful_shutdown": 1, **config}
        self.server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=self.port, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        scheme = "https" if config.get("ssl_certfile") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class Shout:
    """A test plugin: upper-cases the output; a user message "boom" makes pre_process fail (the 500 path)."""

    def pre_process(self, messages):
        if any(m["content"] == "boom" for m in messages):
            raise RuntimeError("plugin failure with a secret detail")
        return messages

    def post_process(self, text):
        return text.upper()
