"""Who may call the server: API keys, signed temporary tokens, an IP allowlist, and a per-key rate limit.

- API keys arrive as `Authorization: Bearer <key>`. Only SHA-256 digests are kept and every configured digest is
  compared with `hmac.compare_digest`, so the time taken reveals nothing about the key (vLLM's authenticate.py
  does the same).
- Temporary tokens: `dsv3t.<key id>.<expiry unix s>.<hex HMAC-SHA256(key, "<key id>.<expiry>")>`. The key id is a
  digest prefix of the key that signed it, so the server finds the key without the token carrying it; a token whose
  expiry has passed (401 saying so), or whose signature does not verify, or that is malformed, is rejected (401).
  `dsv3 token create --expires-in 3600`.
- The allowlist is a list of CIDR networks (`ipaddress`); other clients get 403. It sees the peer's address, or the
  one a proxy named in `--forwarded-allow-ips` forwarded (uvicorn's ProxyHeadersMiddleware, app.py).
- Host names (`--allowed-hosts`): a request whose Host header names another host is refused (400), so a web page
  whose DNS name was rebound to 127.0.0.1 cannot reach a server bound to loopback.
- Rate limit: a token bucket per caller (the key id, or the client address when keys are off): `rate` requests
  per second refill a bucket of `burst`; an empty bucket answers 429 with Retry-After.
Keys never appear in logs or metrics: only key ids do; the access log shows no query-string values
(`?api_key=...` is not how keys are sent, but clients try it).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import threading
import time
from datetime import datetime, timezone

TOKEN_PREFIX = "dsv3t"
_EXPIRY = re.compile(r"[0-9]{1,15}")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class ExpiredTokenError(Exception):
    """A token whose signature verifies but whose expiry has passed (the server answers 401 saying so)."""

    def __init__(self, expiry: int) -> None:
        when = datetime.fromtimestamp(expiry, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        super().__init__(f"The token expired at {when}; create a new one (dsv3 token create).")


def key_id(key: str) -> str:
    """A public name for a key: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _signature(key: str, kid: str, expiry: int) -> str:
    return hmac.new(key.encode(), f"{kid}.{expiry}".encode(), hashlib.sha256).hexdigest()


def create_token(key: str, expires_in: float, now: float | None = None) -> str:
    """A temporary token for `key`, valid for `expires_in` seconds."""
    if not key:
        raise ValueError("create_token: the API key is empty")
    expiry = int((time.time() if now is None else now) + expires_in)
    kid = key_id(key)
    return f"{TOKEN_PREFIX}.{kid}.{expiry}.{_signature(key, kid, expiry)}"


class KeyRing:
    """The configured API keys; `authenticate(bearer)` returns the caller's key id, or None if refused."""

    def __init__(self, keys: list[str]) -> None:
        if any(not k for k in keys):
            raise ValueError("API keys must be non-empty strings")
        self._keys = {key_id(k): k for k in keys}
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def authenticate(self, bearer: str, now: float | None = None) -> str | None:
        if bearer.startswith(TOKEN_PREFIX + "."):
            return self._check_token(bearer, time.time() if now is None else now)
        digest = hashlib.sha256(bearer.encode()).digest()
        match = False
        for known in self._digests:  # no early exit: the same work whichever key matches
            match |= hmac.compare_digest(digest, known)
        return key_id(bearer) if match else None

    def _check_token(self, token: str, now: float) -> str | None:
        """The key id of a valid token; None for a bad one; raises ExpiredTokenError for an expired one."""
        parts = token.split(".")
        if len(parts) != 4 or not _EXPIRY.fullmatch(parts[2]):
            return None
        _, kid, expiry, signature = parts
        key = self._keys.get(kid)
        if key is None or not hmac.compare_digest(_signature(key, kid, int(expiry)), signature):
            return None
        if int(expiry) <= now:
            raise ExpiredTokenError(int(expiry))
        return kid


class Allowlist:
    """Client addresses allowed to connect (empty: everyone)."""

    def __init__(self, cidrs: list[str]) -> None:
        try:
            self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        except ValueError as error:
            raise ValueError(f"allowlist: {error} (expected CIDR like 10.0.0.0/8 or 127.0.0.1/32)") from None

    def allows(self, host: str | None) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        return any(address in net for net in self.networks)


class HostCheck:
    """Host header names allowed (empty: any). Names are compared without the port, case-insensitively."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = {h.lower().strip("[]") for h in hosts}

    def allows(self, header: str | None) -> bool:
        if not self.hosts or "*" in self.hosts:
            return True
        host = (header or "").lower()
        name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
        return name in self.hosts


def default_allowed_hosts(bind_host: str) -> list[str]:
    """Loopback names when the server is bound to loopback (a browser's rebound DNS name is refused), else any."""
    try:
        loopback = bind_host == "localhost" or ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = False
    return list(LOOPBACK_HOSTS) if loopback else []


class RedactQuery(logging.Filter):
    """Blanks query-string values in uvicorn's access log lines (record.args[2] is the path with its query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            path, _, query = args[2].partition("?")
            query = re.sub(r"=[^&]*", "=[redacted]", query)
            record.args = args[:2] + (f"{path}?{query}",) + args[3:]
        return True


def redact_access_log() -> None:
    """Install RedactQuery on uvicorn's access logger (once)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in logger.filters):
        logger.addFilter(RedactQuery())


class RateLimiter:
    """Token buckets keyed by caller: `rate` per second, capacity `burst`. rate <= 0 disables limiting."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    MAX_CALLERS = 10_000  # beyond this many buckets, forget the callers whose buckets have refilled

    def check(self, caller: str, now: float | None = None) -> float:
        """Take one token; return 0 if allowed, else the seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._buckets) > self.MAX_CALLERS:  # a full bucket is the same as no bucket
                full = now - self.burst / self.rate
                self._buckets = {k: v for k, v in self._buckets.items() if v[1] > full}
            tokens, last = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) / self.rate


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))}
