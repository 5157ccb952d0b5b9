"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with OpenAI's status codes.

The openai SDK maps the status to its exception class (400 BadRequestError, 401 AuthenticationError, 403
PermissionDeniedError, 404 NotFoundError, 429 RateLimitError, >= 500 InternalServerError) and reads message/type/
param/code from the body; it retries 429 and 5xx, waiting Retry-After seconds when that is at most 60
(docs/openai-api.md §3).
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_denied_error",
          404: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_overloaded"}
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class APIError(Exception):
    """Raised by handlers; rendered by `error_response`. headers: extra response headers (Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code or _CODES.get(status)
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _ASCIIJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote the client's text, lone surrogates included, which UTF-8
    cannot encode (JSON's \\u escapes can)."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(error: APIError) -> JSONResponse:
    return _ASCIIJSON(error.body(), status_code=error.status, headers=error.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _names_a_field(part) -> bool:
    """Validation locations name union members too ("str", "list[int]", "function-after[...]") beside field names
    and list indices; `param` keeps only the latter."""
    return part != "body" and not (isinstance(part, str) and ("[" in part or part in _TYPE_TAGS))


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """FastAPI's validation errors -> one readable message and the offending parameter (dotted path)."""
    # a union's members each report a mismatch of type; a member's own complaint (too long, too big) says more
    first = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0] if errors else {})
    loc = [str(p) for p in first.get("loc", ()) if _names_a_field(p)]
    param = ".".join(loc) or None
    text = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {text}" if param else text) + more, param
