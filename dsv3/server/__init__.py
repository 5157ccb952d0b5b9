"""OpenAI-compatible HTTP server over dsv3.engine (`dsv3 serve`): app.py (routes, auth, request ids, metrics
middleware), chat.py and completions.py (the two generation endpoints), common.py (what they share: engine
requests, usage, SSE), schemas.py, security.py, metrics.py, errors.py, cli.py (`serve`, `token create`).

The server's dependencies (fastapi, uvicorn, prometheus-client: the `server` extra) load on first use, so `dsv3`'s
other subcommands run without them.
"""

from .cli import add_cli

__all__ = ["ServerSettings", "add_cli", "build_app", "create_app", "create_token"]


def __getattr__(name: str):
    if name in ("ServerSettings", "create_app"):
        from . import app

        return getattr(app, name)
    if name == "build_app":
        from .cli import build_app

        return build_app
    if name == "create_token":
        from .security import create_token

        return create_token
    raise AttributeError(f"module 'dsv3.server' has no attribute {name!r}")
