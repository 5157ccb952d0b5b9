"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with OpenAI's status codes.

The openai SDK maps the status to its exception class (400 BadRequestError, 401 AuthenticationError, 403
PermissionDeniedError, 404 NotFoundError, 429 RateLimitError, >= 500 InternalServerError) and reads message/type/
param/code from the body; it retries 429 and 5xx, waiting Retry-After seconds when that is at most 60
(../shared/reference/compat-server.md §3).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_denied_error",
          404: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_overloaded"}


class APIError(Exception):
    """Raised by handlers; rendered by `error_response`. headers: extra response headers (Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """FastAPI's validation errors -> one readable message and the offending parameter (dotted path)."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    text = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {text}" if param else text) + more, param
