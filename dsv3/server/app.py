"""The FastAPI application: routes, authentication, request ids, error shapes and metrics around the engine.

`create_app(engine, tokenizer, settings)` returns an ASGI app whose lifespan starts and stops the engine thread.
Public routes (no key, as vLLM's PUBLIC_ENDPOINTS): /health (liveness), /ready (readiness: 200 once warmed up,
503 while warming up or draining; lifecycle.py), /metrics, and the API's description (/docs, Swagger
UI, and /openapi.json: the routes and their fields, no data). Everything under /v1 needs a key when keys are
configured, and passes the per-caller rate limit. An outermost ASGI middleware gives every response an
`x-request-id` (also set for the log lines of the request: logs.py), refuses API requests while the server
drains, checks the Host header and the IP allowlist, caps the request body, counts requests by endpoint and
status (labels from a closed set), and turns an unhandled exception into a generic 500 whose request id is logged
with the traceback. Outside it, uvicorn's ProxyHeadersMiddleware takes the client address from X-Forwarded-For only
when the peer is one of `forwarded_allow_ips`. docs/security.md describes what each setting protects.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from .chat import chat_completions
from .completions import completions
from .errors import APIError, error_response, validation_message
from .images import ImageLimits
from .lifecycle import Lifecycle
from .logs import REQUEST_ID
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse
from .security import Allowlist, ExpiredTokenError, HostCheck, KeyRing, RateLimiter, retry_after_header

log = logging.getLogger("dsv3.server")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # metric labels; else "other"
_ERRORS = {400: "Invalid request: a field is missing, malformed or out of range (`param` names it)",
           401: "Missing, wrong or expired API key", 403: "Client address not allowed",
           404: "Unknown model or route", 405: "Method not allowed", 413: "Request body larger than the cap",
           429: "Rate limit reached (Retry-After)", 500: "Internal error (the request id is in the message)",
           503: "Waiting queue full, or shutting down (Retry-After)"}
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()}


@dataclass
class ServerSettings:
    """What the app needs beyond the engine. rate_limit: requests/s per caller (0 = off); rate_burst: bucket size
    (default = rate_limit); plugins: "module:Class" names, instantiated without arguments.

    Limits on one request: max_body_bytes (413 beyond it), max_prompts (prompts in one completions request),
    max_request_tokens (their tokens together), max_logprob_values (n x tokens x (top_logprobs + 1) over the
    choices: the size of a logprobs response). forwarded_allow_ips: proxies (IPs or CIDRs, "*" for any) whose
    X-Forwarded-For names the client; empty trusts no header. allowed_hosts: Host header names accepted (empty:
    any; `dsv3 serve` defaults to the loopback names when bound to loopback). shared_prefix_cache: one prefix cache
    for every API key (a single tenant); by default each key's prompts are cached apart."""

    model_name: str = "dsv3"
    api_keys: list[str] = field(default_factory=list)
    allow_cidrs: list[str] = field(default_factory=list)
    rate_limit: float = 100.0
    rate_burst: float | None = None
    plugins: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 << 20
    max_prompts: int = 256
    max_request_tokens: int = 1 << 17
    max_logprob_values: int = 1 << 16
    forwarded_allow_ips: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    shared_prefix_cache: bool = False

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompts", "max_request_tokens", "max_logprob_values"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for proxy in (p for p in self.forwarded_allow_ips if p != "*"):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"forwarded_allow_ips: {proxy!r} is not an IP address or CIDR (or '*')") from None


def load_plugin(spec: str):
    """'package.module:Class' -> an instance (constructed without arguments)."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"plugin {spec!r}: expected 'module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"plugin {spec!r}: {error}") from None
    plugin = cls()
    if not (hasattr(plugin, "pre_process") or hasattr(plugin, "post_process")):
        raise ValueError(f"plugin {spec!r} has neither pre_process nor post_process")
    return plugin


class AppState:
    def __init__(self, engine, tokenizer, settings: ServerSettings, vision=None, image_limits=None) -> None:
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        # a VisionLanguageModel whose language_model the engine runs (None: text only), and its image limits
        self.vision, self.image_limits = vision, image_limits or ImageLimits()
        self.model_name = settings.model_name
        self.keys = KeyRing(settings.api_keys)
        self.allowlist = Allowlist(settings.allow_cidrs)
        self.hosts = HostCheck(settings.allowed_hosts)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.plugins = [load_plugin(p) for p in settings.plugins]
        self.metrics = Metrics(engine, settings.model_name)
        self.lifecycle = Lifecycle(engine)
        self.created = int(time.time())
        # the most UTF-8 bytes one token stands for (special tokens included): bounds the text that can fit
        self.longest_token = max(len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size))


class RequestContext:
    """Pure ASGI middleware (streams pass through untouched): request id, Host check, allowlist, body cap, metrics,
    last-resort 500."""

    def __init__(self, app, state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        REQUEST_ID.set(rid)  # this request's task context: its log lines carry the id
        status, started, begin = 500, False, time.monotonic()
        api = scope["path"].startswith("/v1/")  # what a drain waits for, and refuses once it has begun
        lifecycle = self.state.lifecycle

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            refusal = self._refusal(scope, headers)
            if refusal is None and api and lifecycle.draining:
                refusal = APIError(503, "the server is shutting down; retry (another replica will answer)",
                                   code="shutting_down", headers=retry_after_header(1))
            if refusal is not None:
                return await error_response(refusal)(scope, receive, send_with_id)
            lifecycle.inflight += api
            try:
                await self.app(scope, self._capped(receive), send_with_id)
            finally:
                lifecycle.inflight -= api
        except Exception:
            log.exception("request %s failed", rid)
            if not started:
                response = error_response(APIError(500, f"internal server error (request id {rid})",
                                                   code="internal_error"))
                await response(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")  # the app's route templates: a closed set
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.state.metrics.http_requests.labels(endpoint, method, str(status)).inc()
            self.state.metrics.http_latency.labels(endpoint).observe(time.monotonic() - begin)

    def _refusal(self, scope, headers: dict) -> APIError | None:
        """What refuses the request before it is read: a foreign Host, an address off the allowlist, a declared
        body over the cap."""
        if not self.state.hosts.allows(headers.get(b"host", b"").decode("latin-1")):
            return APIError(400, "the Host header names a host this server does not serve (see --allowed-hosts)",
                            code="invalid_host")
        client = scope.get("client")
        if not self.state.allowlist.allows(client[0] if client else None):
            return APIError(403, "your address is not allowed to use this server", code="ip_not_allowed")
        length = headers.get(b"content-length", b"")  # uvicorn has refused one that is not a number
        if length.isdigit() and int(length) > self.state.settings.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of "
                        f"{self.state.settings.max_body_bytes} bytes (--max-body-bytes)")

    def _capped(self, receive):
        """`receive` that stops a body sent without Content-Length (chunked) once it passes the cap."""
        seen = 0

        async def capped():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.state.settings.max_body_bytes:  # FastAPI passes HTTPExceptions from reading the body
                raise HTTPException(413, self._too_large().message)
            return message

        return capped


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def create_app(engine, tokenizer, settings: ServerSettings | None = None, vision=None,
               image_limits: ImageLimits | None = None) -> FastAPI:
    """The ASGI app serving `engine`; its lifespan starts the engine thread and shuts it down. vision: the
    VisionLanguageModel around the engine's model, for image parts (dsv3/server/images.py)."""
    state = AppState(engine, tokenizer, settings or ServerSettings(), vision, image_limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        warm_up = asyncio.create_task(state.lifecycle.warm_up())  # /health answers meanwhile, /ready 503
        try:
            yield
        finally:
            warm_up.cancel()
            engine.shutdown()

    app = FastAPI(title="dsv3 OpenAI-compatible server", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.dsv3 = state

    async def authorize(request: Request) -> str | None:
        """Authenticate and rate-limit the caller (a key id, or the client address when keys are off); return the
        prefix-cache salt of its requests: the key id, unless the cache is shared (or there are no keys)."""
        if state.keys:
            token = _bearer(request)
            try:
                caller = state.keys.authenticate(token) if token else None
            except ExpiredTokenError as error:
                raise APIError(401, str(error), code="token_expired") from None
            if caller is None:
                raise APIError(401, "Incorrect API key provided." if token else "Missing API key: send "
                               "'Authorization: Bearer <key>'.", code="invalid_api_key")
        else:
            caller = request.client.host if request.client else "unknown"
        wait = state.limiter.check(caller)
        if wait > 0:
            raise APIError(429, f"Rate limit reached: {state.limiter.rate:g} requests per second; retry later.",
                           code="rate_limit_exceeded", headers=retry_after_header(wait))
        return caller if state.keys and not state.settings.shared_prefix_cache else None

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, error: RequestValidationError):  # FastAPI's 422 -> OpenAI's 400
        message, param = validation_message(error.errors())
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request, error: HTTPException):
        return error_response(APIError(error.status_code, str(error.detail), headers=dict(error.headers or {})))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/ready", responses={503: ERROR_RESPONSES[503]})
    async def ready():
        lifecycle = state.lifecycle
        if lifecycle.draining or not lifecycle.ready:
            raise APIError(503, f"not ready: {lifecycle.status}", code="not_ready", headers=retry_after_header(1))
        return {"status": lifecycle.status}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card():
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsv3",
                "max_model_len": engine.max_seq_len}

    @app.get("/v1/models", dependencies=[Depends(authorize)], responses=ERROR_RESPONSES)
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)], responses=ERROR_RESPONSES)
    async def get_model(model_id: str):
        if model_id != state.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat(request: Request, body: ChatCompletionRequest, salt: str | None = Depends(authorize)):
        return await chat_completions(state, request, body, salt)

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def complete(request: Request, body: CompletionRequest, salt: str | None = Depends(authorize)):
        return await completions(state, request, body, salt)

    app.openapi = lambda: _openapi(app)
    app.add_middleware(RequestContext, state=state)
    if state.settings.forwarded_allow_ips:  # outermost: the allowlist and rate limit see the forwarded address
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=state.settings.forwarded_allow_ips)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's OpenAPI document without its 422 (validation failures answer 400, documented per route)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
