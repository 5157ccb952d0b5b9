"""`dsv3 serve` and `dsv3 token create`.

    dsv3 serve [--model DIR] [--host H] [--port P] [--api-key KEY ...] [--config FILE] [--allow-cidr CIDR ...]
               [--rate-limit N] [--ssl-certfile F --ssl-keyfile F] [--plugin module:Class ...] [engine sizes]
               [--compile | --eager] [--log-format text|json] [--drain-timeout S] [--workers 1]
    dsv3 token create --expires-in 3600 [--api-key KEY | $DSV3_API_KEY]

Options come from (last wins) built-in defaults, the --config file (JSON, or TOML when it ends in .toml; keys are
option names, with - or _), then the command line. API keys may also come from $DSV3_API_KEY (comma-separated) and
from the file $DSV3_API_KEY_FILE names (one key a line: a mounted Docker or Kubernetes secret, never in the image).
TLS: uvicorn's SSL context with TLS 1.3 as the minimum version. SIGTERM drains (lifecycle.py); one process serves one
engine, so --workers above 1 is refused: scale out with replicas behind a load balancer (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import math
import os
import socket
import ssl
from argparse import ArgumentTypeError
from pathlib import Path

from ..arguments import REVISION_HELP, device, model_path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (a dependency there)
    import tomli as tomllib

DEFAULTS = dict(model=None, served_model_name=None, host="127.0.0.1", port=8000, api_key=[], allow_cidr=[],
                revision=None,
                rate_limit=100.0, rate_burst=None, ssl_certfile=None, ssl_keyfile=None, plugin=[], max_batch=8,
                max_seq_len=2048, max_waiting=256, max_prefill_tokens=2048, block_size=16, prefix_cache_mb=64.0,
                device="auto", dtype=None, threads=None, quantize=None, keep_fp8=False, adapter=None, compile=None,
                compile_max_batch=8, log_level="info")
# request limits and trust boundaries (docs/security.md); allowed_hosts None: loopback names when bound to loopback
DEFAULTS.update(max_body_bytes=4 << 20, max_prompts=256, max_request_tokens=1 << 17, max_logprob_values=1 << 16,
                forwarded_allow_ips=[], allowed_hosts=None, shared_prefix_cache=False)
# image parts, for a vision-language model (docs/vision.md §4)
DEFAULTS.update(allow_remote_images=False, max_images=4, max_image_bytes=8 << 20, max_image_pixels=16 << 20,
                max_remote_fetches=8)
# running under an orchestrator (docs/deploy.md)
DEFAULTS.update(workers=1, log_format="text", drain_timeout=25.0)
WORKERS_REFUSED = ("one dsv3 serve process runs one engine, which batches every request on the device itself; "
                   "several processes would each load the model and split the device between them. Scale out "
                   "with replicas behind a load balancer (a Kubernetes Service: docs/deploy.md)")


def _bounded(convert, low: float, expected: str, strict: bool = False):
    """An argparse type: `convert` (int or float) of the text, finite and >= low (> low when strict); anything else
    is refused with `expected`. --config values go through the same function (_config_value)."""

    def parse(text: str):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value) or value < low or (strict and value == low):
            raise ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__, parse.base, parse.expected = expected, convert, expected
    return parse


positive_int = _bounded(int, 1, "an integer >= 1")
non_negative = _bounded(float, 0, "a finite number >= 0")
EXPECTED = {int: "an integer", float: "a number", str: "a string"}  # a --config value's type, by its flag's type


@functools.cache
def _serve_actions() -> dict:
    """`dsv3 serve`'s argparse actions by option name: a --config value is checked with its flag's own type, choices
    and range, so the file and the command line cannot drift apart."""
    parser = argparse.ArgumentParser(add_help=False)
    sub = parser.add_subparsers()
    add_cli(sub)
    actions = {}
    for action in sub.choices["serve"]._actions:
        actions.setdefault(action.dest, action)  # --compile / --eager share one name: both are true or false
    return actions


class ConfigValueError(ValueError):
    """A --config value its flag would refuse: what was expected, and the value."""

    def __init__(self, expected: str, value) -> None:
        super().__init__(expected)
        self.expected, self.value = expected, value

    def describe(self, secret: bool) -> str:  # a secret (an API key) is never echoed, only its kind
        got = f"a value of type {type(self.value).__name__}" if secret else repr(self.value)
        return f"expected {self.expected}, got {got}"


def _config_item(action, value):
    """One value for `action` (a list option: one item): its JSON/TOML type first (no bool for a number, no number
    for a string), then the flag's type (range, finiteness) and choices, as argparse applies them to the text."""
    base = getattr(action.type, "base", action.type) or str
    accepted = (int, float) if base is float else (base,)
    expected = getattr(action.type, "expected", EXPECTED.get(base, base.__name__))
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ConfigValueError(expected, value)
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (ArgumentTypeError, TypeError, ValueError):
            raise ConfigValueError(expected, value) from None
    if action.choices is not None and value not in action.choices:
        raise ConfigValueError(f"one of {', '.join(map(str, action.choices))}", value)
    return value


def _config_value(action, value):
    """A --config value checked as its flag would check it. A list option (a repeatable flag) takes a list of
    strings, or one string as a one-item list (api_key = "sk-..." is one key, never a list of its letters); an on/off
    flag takes true or false."""
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ConfigValueError("true or false", value)
        return value
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigValueError("a string or a list of strings", value)
        return [_config_item(action, item) for item in value]
    return _config_item(action, value)


def _read_config(path: str) -> dict:
    file = Path(path)
    try:
        text = file.read_text()
        values = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except FileNotFoundError:
        raise SystemExit(f"--config: {file} does not exist") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise SystemExit(f"--config: {file} is not valid {'TOML' if file.suffix == '.toml' else 'JSON'}: {error}")
    if not isinstance(values, dict):
        raise SystemExit(f"--config: {file} must hold an object of option names to values")
    actions = _serve_actions()
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in DEFAULTS or name == "config":
            raise SystemExit(f"--config: {file}: unknown option {key!r}; known: {', '.join(sorted(DEFAULTS))}")
        if value is None:  # JSON null: the default, as if the key were not there
            continue
        try:
            out[name] = _config_value(actions[name], value)
        except ConfigValueError as error:
            raise SystemExit(f"--config: {file}: {key}: {error.describe(secret=name == 'api_key')}") from None
    return out


def resolve_options(args) -> dict:
    """defaults <- config file <- explicit command-line flags (argparse defaults are None / empty)."""
    options = dict(DEFAULTS)
    if getattr(args, "config", None):
        options.update(_read_config(args.config))
    for name in DEFAULTS:
        value = getattr(args, name, None)
        if value is not None and value != []:
            options[name] = value
    options["api_key"] = list(options["api_key"]) + env_api_keys()
    return options


def env_api_keys() -> list[str]:
    """Keys from $DSV3_API_KEY (comma-separated) and the file $DSV3_API_KEY_FILE (one a line; blank lines and lines
    starting with # skipped)."""
    keys = [k for k in os.environ.get("DSV3_API_KEY", "").split(",") if k]
    path = os.environ.get("DSV3_API_KEY_FILE")
    if path:
        try:
            lines = (line.strip() for line in Path(path).read_text().splitlines())
            keys += [line for line in lines if line and not line.startswith("#")]
        except OSError as error:
            raise SystemExit(f"DSV3_API_KEY_FILE={path}: cannot read it ({error.strerror})") from None
    return keys


def _model_dir(options: dict) -> Path:
    if options["model"]:
        path = model_path(options["model"], options["revision"])
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {path}: no config.json there; expected a directory in the hub layout "
                             "(config.json, model.safetensors, tokenizer.json, tokenizer_config.json)")
        return path
    from .. import bundled_model_path

    try:
        return bundled_model_path()
    except FileNotFoundError as error:
        raise SystemExit(f"no --model given and the bundled model is not available: {error}; "
                         "or pass --model DIR") from None


def compiled_by_default(compile: bool | None, device_type: str) -> bool | None:
    """--compile / --eager as given, else compiled (CUDA graphs) on a GPU, as vLLM serves, and eager on a CPU, where
    the compiled step helps only at low concurrency (docs/performance.md) and costs minutes of start-up."""
    return device_type == "cuda" if compile is None else compile


def _vision(path: Path, options: dict, dtype, where):
    """(the VisionLanguageModel, its ImageLimits) when `path` holds one (config.json has "vision"), else (None,
    None). Quantization and adapters apply to text models only."""
    from ..vision.model import is_vl_model, load_vl
    from .images import ImageLimits

    if not is_vl_model(path):
        return None, None
    for flag in ("quantize", "adapter"):
        if options[flag]:
            raise SystemExit(f"--{flag}: not supported for a vision-language model ({path})")
    try:
        limits = ImageLimits(options["max_images"], options["max_image_bytes"], options["max_image_pixels"],
                             bool(options["allow_remote_images"]),
                             max_remote_fetches=options["max_remote_fetches"])
    except ValueError as error:  # ImageLimits names the field first
        field, _, rest = str(error).partition(" ")
        raise SystemExit(f"dsv3 serve: --{field.replace('_', '-')} {rest}") from None
    return load_vl(path, dtype=dtype, device=where), limits


def build_app(options: dict):
    """Load the model and tokenizer and return the ASGI app."""
    import torch

    from ..checkpoint import load_pretrained
    from ..distributed import device as distributed_device
    from ..distributed import world_size
    from ..distributed.serving import engine_class
    from ..engine import EngineConfig
    from ..tokenizer import Tokenizer
    from .app import ServerSettings, create_app

    try:
        where = device(options["device"])  # a --config file's value is checked here too
    except ArgumentTypeError as error:
        raise SystemExit(f"--device {error}") from None
    path = _model_dir(options)
    if world_size() > 1:  # torchrun: each rank holds its share of the model (docs/distributed.md)
        from ..vision.model import is_vl_model

        if options["quantize"] or options["adapter"] or is_vl_model(path):
            raise SystemExit("dsv3 serve: --quantize, --adapter and vision-language models are not supported under "
                             "torchrun (quantize the checkpoint first with `dsv3 quantize`: quantized checkpoints "
                             "and --keep-fp8 load split)")
        where, options["compile"] = str(distributed_device()), False
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    # CPUs without native bf16 matmuls run a bf16 checkpoint several times slower than float32
    default = torch.float32 if torch.device(where).type == "cpu" else None
    dtype = getattr(torch, options["dtype"]) if options["dtype"] else default
    vision, image_limits = _vision(path, options, dtype, where)
    model = vision.language_model if vision else load_pretrained(path, dtype=dtype, device=where,
                                                                 keep_fp8=bool(options["keep_fp8"]))
    if options["quantize"]:  # int4: group 128, widths 128 does not divide zero-padded (dsv3.quant)
        from ..quant import QuantizationError, quantize

        try:
            quantize(model, options["quantize"], pad=True)
        except QuantizationError as error:
            raise SystemExit(f"--quantize {options['quantize']}: {error}") from None
    if options["adapter"]:  # LoRA (PEFT format): merged into float weights, kept beside quantized ones
        from ..lora import AdapterError, load_adapter

        try:
            load_adapter(model, options["adapter"], merge=True)
        except AdapterError as error:
            raise SystemExit(f"--adapter: {error}") from None
    tokenizer = Tokenizer.from_pretrained(path)
    options["compile"] = compiled_by_default(options["compile"], torch.device(where).type)
    try:
        engine_config = EngineConfig(
            max_batch=options["max_batch"], max_seq_len=options["max_seq_len"], max_waiting=options["max_waiting"],
            max_prefill_tokens=options["max_prefill_tokens"], block_size=options["block_size"],
            prefix_cache_bytes=int(options["prefix_cache_mb"] * (1 << 20)), compile=options["compile"],
            compile_max_batch=options["compile_max_batch"])
    except ValueError as error:  # a size from the command line or the config file, named in the message
        raise SystemExit(f"dsv3 serve: {error}") from None
    engine = engine_class()(model, tokenizer, engine_config)  # Engine, or rank 0's / a follower's under torchrun
    if options["compile"]:
        logging.getLogger("dsv3.server").info("compiling the decode step before serving (Engine.warmup)")
        engine.warmup()
    hub_id = options["model"] and not Path(options["model"]).is_dir()  # served under its hub id, as vLLM does
    name = options["served_model_name"] or (options["model"] if hub_id else
                                            path.resolve().name if options["model"] else "dsv3")
    from .security import default_allowed_hosts

    hosts = options["allowed_hosts"]
    try:
        settings = ServerSettings(
            model_name=name, api_keys=options["api_key"], allow_cidrs=options["allow_cidr"],
            rate_limit=options["rate_limit"], rate_burst=options["rate_burst"], plugins=options["plugin"],
            max_body_bytes=options["max_body_bytes"], max_prompts=options["max_prompts"],
            max_request_tokens=options["max_request_tokens"], max_logprob_values=options["max_logprob_values"],
            forwarded_allow_ips=options["forwarded_allow_ips"], shared_prefix_cache=options["shared_prefix_cache"],
            allowed_hosts=default_allowed_hosts(options["host"]) if hosts is None else hosts)
    except ValueError as error:
        field, _, rest = str(error).partition(" ")  # ServerSettings names the field first
        raise SystemExit(f"dsv3 serve: --{field.replace('_', '-')} {rest}") from None
    return create_app(engine, tokenizer, settings, vision, image_limits)


def serve(args) -> int:
    from ..distributed import init, rank
    from .lifecycle import DrainingServer
    from .logs import configure_logging

    options = resolve_options(args)
    workers, grace = options["workers"], options["drain_timeout"]
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SystemExit(f"--workers {workers}: expected 1")
    if workers > 1:
        raise SystemExit(f"--workers {workers}: {WORKERS_REFUSED}")
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 < grace < math.inf:
        raise SystemExit(f"--drain-timeout {grace}: expected a positive number of seconds")
    if bool(options["ssl_certfile"]) != bool(options["ssl_keyfile"]):
        raise SystemExit("--ssl-certfile and --ssl-keyfile go together")
    check_tls_files(options)  # before the model loads, as the port is: a wrong path fails at once
    log_options = configure_logging(options["log_level"], options["log_format"])
    if init() > 1 and rank() > 0:  # torchrun: rank 0 serves HTTP; the others follow its engine steps
        return build_app(options).state.dsv3.lifecycle.engine.follow()
    sock = listen(options["host"], options["port"])  # before the model loads: a busy port fails at once
    app = build_app(options)
    config = uvicorn_config(app, host=options["host"], port=options["port"], log_level=options["log_level"],
                            ssl_certfile=options["ssl_certfile"], ssl_keyfile=options["ssl_keyfile"], **log_options)
    scheme = "https" if options["ssl_certfile"] else "http"  # uvicorn logs no address for a socket it is given
    logging.getLogger("dsv3.server").info("serving on %s://%s:%d/v1 (Ctrl-C stops; SIGTERM drains)", scheme,
                                          *sock.getsockname()[:2])
    try:
        DrainingServer(config, app.state.dsv3.lifecycle, grace).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises Ctrl-C: the usual way to stop
        pass
    return 0


def check_tls_files(options: dict) -> None:
    """--ssl-certfile and --ssl-keyfile, when given, must be files this process can read (uvicorn reads them only
    after the model has loaded, and its error names neither flag nor path)."""
    for name in ("ssl_certfile", "ssl_keyfile"):
        path = options[name]
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise SystemExit(f"--{name.replace('_', '-')} {path}: cannot read it "
                             f"({error.strerror or error})") from None


def listen(host: str, port) -> socket.socket:
    """The server's socket, bound to host:port (uvicorn serves on it); a bad or busy address is one clear line."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise SystemExit(f"--port {port}: expected a port number from 1 to 65535")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise SystemExit(f"--host {host}: {error.strerror}") from None
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        hint = "; another server is listening there: pick another --port" if error.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"--port {port}: cannot listen on {host}:{port} ({error.strerror}){hint}") from None
    return sock


def uvicorn_config(app, **kwargs):
    """uvicorn.Config(app, **kwargs), loaded, with TLS 1.3 as the minimum protocol when TLS is on (uvicorn has no
    option for a minimum version, so it is set on the SSL context uvicorn built). uvicorn's own proxy-header
    handling is off (it trusts X-Forwarded-For from 127.0.0.1 by default): the app trusts only
    --forwarded-allow-ips. Query-string values are blanked in the access log."""
    import uvicorn

    from .security import redact_access_log

    config = uvicorn.Config(app, **{"proxy_headers": False, **kwargs})
    config.load()
    redact_access_log()
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_3
    return config


def token_create(args) -> int:
    from .security import create_token

    keys = [args.api_key] if args.api_key else []
    if not keys and args.config:
        keys = list(_read_config(args.config).get("api_key", []))
    keys += env_api_keys()
    if not keys:
        raise SystemExit("token create: give --api-key KEY (or set DSV3_API_KEY, or api_key in --config)")
    if args.expires_in <= 0:
        raise SystemExit(f"--expires-in must be positive, got {args.expires_in}")
    print(create_token(keys[0], args.expires_in))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", help="model directory (hub layout) or hub id, e.g. deepseek-ai/DeepSeek-V3 (fetched "
                   "with huggingface_hub; HF_HUB_OFFLINE=1: from its cache only); default: the bundled model")
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory name)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port, 1-65535 (default 8000)")
    p.add_argument("--api-key", action="append", help="accepted API key (repeatable; also "
                   "$DSV3_API_KEY, comma-separated, and the file $DSV3_API_KEY_FILE, one a line; # comments)")
    p.add_argument("--config", help="JSON or TOML file of options (command-line flags win)")
    p.add_argument("--allow-cidr", action="append", help="client network allowed, e.g. 10.0.0.0/8 (repeatable)")
    p.add_argument("--rate-limit", type=non_negative, help="requests per second per key (default 100; 0 = off)")
    p.add_argument("--rate-burst", type=non_negative, help="token-bucket size (default: the rate)")
    p.add_argument("--ssl-certfile", help="TLS certificate (PEM); TLS 1.3 minimum")
    p.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    p.add_argument("--plugin", action="append", help="module:Class with pre_process/post_process (repeatable)")
    p.add_argument("--max-batch", type=int, help="requests decoded together (cache rows; default 8)")
    p.add_argument("--max-seq-len", type=int, help="tokens per request, prompt + completion (default 2048)")
    p.add_argument("--max-waiting", type=int, help="queued requests before 503 (default 256)")
    p.add_argument("--max-prefill-tokens", type=int, help="prompt tokens prefilled per step (default 2048)")
    p.add_argument("--block-size", type=int, help="prefix-cache block length in tokens (default 16)")
    p.add_argument("--prefix-cache-mb", type=non_negative,
                   help="prefix-cache memory cap in MiB (default 64; 0 = off)")
    p.add_argument("--device", help="torch device: auto (default: cuda when available, else cpu), cpu, cuda:1 ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"],
                   help="weights dtype (default: float32 on CPU, the checkpoint's on other devices)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's, one per core); "
                   "on a small CPU box 1 leaves a core to the HTTP side")
    p.add_argument("--quantize", choices=["int8", "int4", "fp8"],
                   help="quantize the weights after loading (dsv3.quant; int4 uses groups of 128); checkpoints "
                        "written by `dsv3 quantize` load quantized without it")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format, e.g. from `dsv3 finetune`) applied after "
                   "loading (and after --quantize)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--compile", action="store_true", default=None,
                      help="torch.compile the batched decode step, compiled at startup (CUDA graphs captured for "
                           "each batch size up to --compile-max-batch, as vLLM does); the default on a GPU. On a "
                           "CPU: a few graphs of about a minute each, faster at low concurrency")
    form.add_argument("--eager", dest="compile", action="store_false", default=None,
                      help="run the decode step eagerly (the reference), also on a GPU: starts in seconds")
    p.add_argument("--compile-max-batch", type=int, help="with --compile, batches of more rows run the eager step "
                   "(default 8: the compiled step attends over all --max-seq-len slots, which costs more than it "
                   "saves at 32 rows on CPU)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    # running under an orchestrator: docs/deploy.md
    p.add_argument("--log-format", choices=["text", "json"], help="text lines (default) or one JSON object per line, "
                   "each with the request id (x-request-id) of the request it belongs to")
    p.add_argument("--drain-timeout", type=float, help="on SIGTERM: seconds the requests in flight get to finish "
                   "while new ones get 503 and /ready answers 503 (default 25; keep below the orchestrator's grace)")
    p.add_argument("--workers", type=int, help="server processes: only 1; scale out with replicas behind a load "
                   "balancer (docs/deploy.md)")
    # request limits and trust boundaries: docs/security.md
    p.add_argument("--allow-remote-images", action="store_true", default=None,
                   help="fetch http(s) image URLs (public addresses only); by default only data: URLs are read")
    p.add_argument("--max-images", type=int, help="image parts per request (default 4)")
    p.add_argument("--max-image-bytes", type=int, help="encoded bytes per image (default 8 MiB)")
    p.add_argument("--max-image-pixels", type=int, help="width x height per image, from its header (default 16M)")
    p.add_argument("--max-remote-fetches", type=int, help="requests fetching remote images at once, server-wide; "
                   "the next gets a 429 (default 8; with --allow-remote-images)")
    p.add_argument("--max-body-bytes", type=int, help="request body cap, 413 beyond it (default 4 MiB)")
    p.add_argument("--max-prompts", type=int, help="prompts in one completions request (default 256)")
    p.add_argument("--max-request-tokens", type=int, help="prompt tokens in one request (default 131072)")
    p.add_argument("--max-logprob-values", type=int, help="log-probabilities in one response: n x tokens x "
                   "(top_logprobs + 1) (default 65536)")
    p.add_argument("--forwarded-allow-ips", action="append", help="proxy IP or CIDR whose X-Forwarded-For names "
                   "the client (repeatable; default: none, the header is ignored)")
    p.add_argument("--allowed-hosts", action="append", help="Host header name accepted (repeatable; '*' = any; "
                   "default: localhost, 127.0.0.1, ::1 when bound to loopback, else any)")
    p.add_argument("--keep-fp8", action="store_true", default=None, help="keep an FP8 checkpoint's weights in FP8 "
                   "(DeepSeek-V3's release: half the bytes of bf16; fused kernel on sm90 GPUs) instead of dequantising "
                   "them; under torchrun each rank reads its FP8 slices")
    p.add_argument("--shared-prefix-cache", action="store_true", default=None, help="one prefix cache for all API "
                   "keys (single tenant); by default each key's prompts are cached apart")
    p.set_defaults(func=serve)

    t = subparsers.add_parser("token", help="temporary API tokens")
    tsub = t.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    c = tsub.add_parser("create", help="print a token signed with an API key (HMAC-SHA256 over key id + expiry)")
    c.add_argument("--expires-in", type=int, default=3600, help="lifetime in seconds (default 3600)")
    c.add_argument("--api-key", help="the signing key (default: $DSV3_API_KEY or the --config file's)")
    c.add_argument("--config", help="server config file to read api_key from")
    c.set_defaults(func=token_create)

