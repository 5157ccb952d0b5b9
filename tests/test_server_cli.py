"""`dsv3 serve`'s options as a user gives them: --config values are checked as their command-line flags are (type,
choices, range; a string for a repeatable option is one item, never a list of its letters), out-of-range flags are
argparse errors, the TLS files are checked before the model loads, and Ctrl-C (twice) stops without a traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from server_utils import free_port
from test_cli import dsv3_env

from dsv3.cli import build_parser
from dsv3.server import cli, security
from dsv3.server.cli import DEFAULTS, resolve_options, token_create

LIST_OPTIONS = ["api_key", "allow_cidr", "forwarded_allow_ips", "allowed_hosts", "plugin"]


@pytest.fixture(autouse=True)
def no_env_keys(monkeypatch):
    monkeypatch.delenv("DSV3_API_KEY", raising=False)
    monkeypatch.delenv("DSV3_API_KEY_FILE", raising=False)


def configured(tmp_path, values: dict | str, name: str = "c.json") -> dict:
    """`dsv3 serve --config FILE`'s options, FILE holding `values` (JSON, or the text as given)."""
    path = tmp_path / name
    path.write_text(values if isinstance(values, str) else json.dumps(values))
    return resolve_options(build_parser().parse_args(["serve", "--config", str(path)]))


@pytest.mark.parametrize("name", LIST_OPTIONS)
def test_a_string_for_a_list_option_is_one_item_never_its_letters(tmp_path, name):
    assert configured(tmp_path, {name: "sk-local"})[name] == ["sk-local"]
    assert configured(tmp_path, {name.replace("_", "-"): ["a", "bc"]})[name] == ["a", "bc"]
    assert configured(tmp_path, f'{name} = "sk-local"\n', "c.toml")[name] == ["sk-local"]
    for value, expected in ((5, "expected a string or a list of strings"), ({"a": "b"}, "expected a string or a "
                            "list of strings"), (["ok", 5], "expected a string, got"), ([["x"]], "expected a string")):
        with pytest.raises(SystemExit, match=f"^--config: .*c.json: {name.replace('_', '-')}: {expected}"):
            configured(tmp_path, {name.replace("_", "-"): value})


def test_api_key_string_is_the_key_and_bad_keys_are_not_echoed(tmp_path, capsys, monkeypatch):
    options = configured(tmp_path, {"api_key": "sk-local"})
    assert options["api_key"] == ["sk-local"] and "s" not in options["api_key"]
    with pytest.raises(SystemExit) as stop:
        configured(tmp_path, {"api_key": {"k": "sk-secret-value"}})
    assert "sk-secret-value" not in str(stop.value) and "api_key" in str(stop.value)
    (tmp_path / "t.json").write_text('{"api_key": "sk-local"}')  # token create signs with the whole key
    monkeypatch.setattr(security, "create_token", lambda key, expires_in: f"signed-with:{key}")
    token_create(build_parser().parse_args(["token", "create", "--config", str(tmp_path / "t.json")]))
    assert capsys.readouterr().out == "signed-with:sk-local\n"


BAD_VALUES = [  # (key, value, what the line says after "key: ")
    ("threads", "x", "expected an integer >= 1, got 'x'"),
    ("threads", -1, "expected an integer >= 1, got -1"),
    ("threads", 0, "expected an integer >= 1, got 0"),
    ("threads", 1.5, "expected an integer >= 1, got 1.5"),
    ("dtype", "foo", "expected one of float32, bfloat16, float16, float64, got 'foo'"),
    ("dtype", "int8", "expected one of float32, bfloat16, float16, float64, got 'int8'"),
    ("quantize", "int3", "expected one of int8, int4, fp8, got 'int3'"),
    ("log_format", "xml", "expected one of text, json, got 'xml'"),
    ("host", 5, "expected a string, got 5"),
    ("device", ["cpu"], "expected a string, got ['cpu']"),
    ("port", "8000", "expected an integer, got '8000'"),
    ("port", True, "expected an integer, got True"),
    ("max_batch", 8.0, "expected an integer, got 8.0"),
    ("rate_limit", "x", "expected a finite number >= 0, got 'x'"),
    ("rate_limit", float("nan"), "expected a finite number >= 0, got nan"),
    ("rate_limit", -1, "expected a finite number >= 0, got -1"),
    ("rate_burst", float("inf"), "expected a finite number >= 0, got inf"),
    ("prefix_cache_mb", "x", "expected a finite number >= 0, got 'x'"),
    ("drain_timeout", "25s", "expected a number, got '25s'"),
    ("keep_fp8", "yes", "expected true or false, got 'yes'"),
    ("compile", 1, "expected true or false, got 1"),
    ("shared_prefix_cache", "false", "expected true or false, got 'false'"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_config_values_are_checked_as_their_flags(tmp_path, key, value, message):
    with pytest.raises(SystemExit) as stop:
        configured(tmp_path, {key: value})
    assert str(stop.value) == f"--config: {tmp_path / 'c.json'}: {key}: {message}"


def test_good_config_values_keep_their_meaning(tmp_path):
    options = configured(tmp_path, {"rate_limit": 5, "threads": 2, "dtype": "bfloat16", "compile": False,
                                    "rate_burst": None, "prefix-cache-mb": 0, "drain_timeout": 2.5})
    assert options["rate_limit"] == 5.0 and isinstance(options["rate_limit"], float)
    assert (options["threads"], options["dtype"], options["compile"]) == (2, "bfloat16", False)
    assert options["rate_burst"] is None and options["prefix_cache_mb"] == 0 and options["drain_timeout"] == 2.5
    assert configured(tmp_path, 'threads = 3\nlog_level = "debug"\n', "c.toml")["threads"] == 3
    args = build_parser().parse_args(["serve", "--rate-limit", "0", "--threads", "1", "--drain-timeout", "3"])
    assert (args.rate_limit, args.threads, args.drain_timeout) == (0.0, 1, 3.0)  # the flags' types, range-checked


def test_every_option_is_checked_by_its_flag():
    """The config file's keys are the flags' names: each has an argparse action to check it by."""
    assert set(DEFAULTS) <= set(cli._serve_actions())


@pytest.mark.parametrize("argv, message", [
    ("--threads -1", "argument --threads: expected an integer >= 1, got '-1'"),
    ("--threads 0", "argument --threads: expected an integer >= 1, got '0'"),
    ("--rate-limit nan", "argument --rate-limit: expected a finite number >= 0, got 'nan'"),
    ("--rate-limit inf", "argument --rate-limit: expected a finite number >= 0, got 'inf'"),
    ("--rate-burst -2", "argument --rate-burst: expected a finite number >= 0, got '-2'"),
    ("--prefix-cache-mb nan", "argument --prefix-cache-mb: expected a finite number >= 0, got 'nan'"),
])
def test_out_of_range_flags_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["serve", *argv.split()])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"dsv3 serve: error: {message}") and err.count("\n") == 1, err


def test_tls_files_and_drain_timeout_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    def not_reached(*args, **kwargs):
        raise AssertionError("the TLS files should have been refused before this")

    monkeypatch.setattr(cli, "listen", not_reached)
    monkeypatch.setattr(cli, "build_app", not_reached)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def serve(*argv):
        with pytest.raises(SystemExit) as stop:
            cli.serve(build_parser().parse_args(["serve", *argv]))
        return str(stop.value)

    assert serve("--ssl-certfile", str(cert), "--ssl-keyfile", str(key)) == (
        f"--ssl-certfile {cert}: cannot read it (No such file or directory)")
    cert.write_text("not really a certificate")
    assert serve("--ssl-certfile", str(cert), "--ssl-keyfile", str(key)) == (
        f"--ssl-keyfile {key}: cannot read it (No such file or directory)")
    assert serve("--ssl-certfile", str(cert), "--ssl-keyfile", str(tmp_path)) == (
        f"--ssl-keyfile {tmp_path}: cannot read it (Is a directory)")
    assert serve("--ssl-certfile", str(cert)) == "--ssl-certfile and --ssl-keyfile go together"
    assert serve("--drain-timeout", "inf") == "--drain-timeout inf: expected a positive number of seconds"
    (tmp_path / "c.json").write_text(json.dumps({"ssl_keyfile": str(key), "ssl_certfile": str(cert)}))
    assert serve("--config", str(tmp_path / "c.json")) == f"--ssl-keyfile {key}: cannot read it (No such file or " \
                                                           "directory)"


def test_ctrl_c_twice_stops_without_a_traceback(tmp_path):
    """Ctrl-C, then Ctrl-C again while uvicorn shuts down (its "force quit"): the app's lifespan still ends (the
    engine stops) instead of being cancelled as the event loop closes, which logged a CancelledError traceback."""
    port = free_port()
    err = tmp_path / "stderr"
    with err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--port", str(port), "--eager",
                                 "--threads", "1"], env=dsv3_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        while "Shutting down" not in err.read_text():  # uvicorn's shutdown: 0.1 s before the lifespan's turn
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = err.read_text()
    assert code in (0, 130) and "Traceback" not in log and "CancelledError" not in log, log
    assert "Application shutdown complete" in log, log
