"""The FastAPI application: routes, authentication, request ids, error shapes and metrics around the engine.

`create_app(engine, tokenizer, settings)` returns an ASGI app whose lifespan starts and stops the engine thread.
Public routes (no key, as vLLM's PUBLIC_ENDPOINTS): /health, /metrics. Everything under /v1 needs a key when keys
are configured, and passes the per-caller rate limit. An outermost ASGI middleware gives every response an
`x-request-id`, enforces the IP allowlist, counts requests by endpoint and status, and turns an unhandled exception
into a generic 500 whose request id is logged with the traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from .chat import chat_completions
from .completions import completions
from .errors import APIError, error_response, validation_message
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest
from .security import Allowlist, KeyRing, RateLimiter, retry_after_header

log = logging.getLogger("dsv3.server")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PUBLIC_PATHS = ("/health", "/metrics")


@dataclass
class ServerSettings:
    """What the app needs beyond the engine. rate_limit: requests/s per caller (0 = off); rate_burst: bucket size
    (default = rate_limit); plugins: "module:Class" names, instantiated without arguments."""

    model_name: str = "dsv3"
    api_keys: list[str] = field(default_factory=list)
    allow_cidrs: list[str] = field(default_factory=list)
    rate_limit: float = 100.0
    rate_burst: float | None = None
    plugins: list[str] = field(default_factory=list)


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
    def __init__(self, engine, tokenizer, settings: ServerSettings) -> None:
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.model_name = settings.model_name
        self.keys = KeyRing(settings.api_keys)
        self.allowlist = Allowlist(settings.allow_cidrs)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.plugins = [load_plugin(p) for p in settings.plugins]
        self.metrics = Metrics(engine, settings.model_name)
        self.created = int(time.time())


class RequestContext:
    """Pure ASGI middleware (streams pass through untouched): request id, allowlist, metrics, last-resort 500."""

    def __init__(self, app, state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status, started, begin = 500, False, time.monotonic()

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            client = scope.get("client")
            if not self.state.allowlist.allows(client[0] if client else None):
                response = error_response(APIError(403, "your address is not allowed to use this server",
                                                   code="ip_not_allowed"))
                return await response(scope, receive, send_with_id)
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", rid)
            if not started:
                response = error_response(APIError(500, f"internal server error (request id {rid})",
                                                   code="internal_error"))
                await response(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.state.metrics.http_requests.labels(endpoint, scope["method"], str(status)).inc()
            self.state.metrics.http_latency.labels(endpoint).observe(time.monotonic() - begin)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def create_app(engine, tokenizer, settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app serving `engine`; its lifespan starts the engine thread and shuts it down."""
    state = AppState(engine, tokenizer, settings or ServerSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="dsv3 OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.dsv3 = state

    async def authorize(request: Request) -> str:
        """The caller's identity for rate limiting: a key id, or the client address when keys are off."""
        if state.keys:
            token = _bearer(request)
            caller = state.keys.authenticate(token) if token else None
            if caller is None:
                raise APIError(401, "Incorrect API key provided." if token else "Missing API key: send "
                               "'Authorization: Bearer <key>'.", code="invalid_api_key")
        else:
            caller = request.client.host if request.client else "unknown"
        wait = state.limiter.check(caller)
        if wait > 0:
            raise APIError(429, f"Rate limit reached: {state.limiter.rate:g} requests per second; retry later.",
                           code="rate_limit_exceeded", headers=retry_after_header(wait))
        return caller

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, error: RequestValidationError):  # FastAPI's 422 -> OpenAI's 400
        message, param = validation_message(error.errors())
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, str(error.detail), code=code,
                                       headers=dict(error.headers or {})))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card():
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsv3",
                "max_model_len": engine.max_seq_len}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str):
        if model_id != state.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request, body: ChatCompletionRequest):
        return await chat_completions(state, request, body)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def complete(request: Request, body: CompletionRequest):
        return await completions(state, request, body)

    app.add_middleware(RequestContext, state=state)
    return app
