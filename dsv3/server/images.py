"""Image content parts for a vision-language model (docs/vision.md §4, docs/security.md): read, check, embed.

A part is {"type": "image_url", "image_url": {"url": ...}} or {"type": "input_image", "image_url": ...}. A `data:`
URL (PNG, JPEG or WebP, base64) is decoded after its length is checked; a remote http(s) URL is refused unless
--allow-remote-images, and then fetched by `fetch_remote`: every host name is resolved and each address must be
public (no loopback, private, link-local, multicast or reserved address: no server-side request forgery), the
connection goes to the address that was checked (no DNS rebinding between check and connect), redirects are
followed a few times (each checked again), and the body is read up to --max-image-bytes. All of a request's remote
images share one deadline (fetch_timeout), and at most --max-remote-fetches requests fetch at once across the server
(the next gets a 429): slow hosts named by hostile clients cannot tie up the server's worker threads. The header's
width x height is checked against --max-image-pixels before any pixel is decoded (decompression bombs). Every bad
image is a 400 naming the part (`messages[i].content[j]`) and the reason.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import torch

from ..vision.preprocess import ImageError, decode_data_url, decode_image
from ..vision.prompt import IMAGE_PARTS, expand_images
from .errors import APIError, bad_request

REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class ImageLimits:
    max_images: int = 4               # image parts per request
    max_image_bytes: int = 8 << 20    # encoded bytes per image
    max_image_pixels: int = 16 << 20  # width x height per image, from the header
    allow_remote: bool = False        # fetch http(s) URLs (public addresses only)
    fetch_timeout: float = 10.0       # seconds for all of one request's remote images, redirects included
    max_redirects: int = 3
    max_remote_fetches: int = 8       # requests fetching remote images at once, server-wide
    fetch_slots: threading.BoundedSemaphore = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_images", "max_image_bytes", "max_image_pixels", "max_remote_fetches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.fetch_slots = threading.BoundedSemaphore(self.max_remote_fetches)


def _public_address(host: str, port: int) -> str:
    """Resolve host; every address it has must be globally routable. Returns the first, to connect to."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise ImageError(f"cannot resolve host {host!r}") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise ImageError(f"host {host!r} resolves to a non-public address ({ip}): refused")
    return addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a fixed address, with the certificate checked for the URL's host name (SNI too)."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


def _check_deadline(limits: ImageLimits, deadline: float) -> None:
    if time.monotonic() > deadline:
        raise ImageError(f"the request's remote images took longer than {limits.fetch_timeout:g} s in all")


def _get(url: str, limits: ImageLimits, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET of url at a checked address -> (status, Location, body up to max_image_bytes)."""
    parts = urlsplit(url)
    if not is_remote(url) or not parts.hostname:
        raise ImageError(f"expected an http(s) URL, got {url[:60]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _public_address(parts.hostname, port)
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = kind(parts.hostname, address, port, max(0.1, deadline - time.monotonic()))
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": "dsv3-serve", "Accept": "image/png, image/jpeg, image/webp"})
        response = conn.getresponse()
        body = b""
        while response.status == 200 and (chunk := response.read(64 << 10)):
            body += chunk
            if len(body) > limits.max_image_bytes:
                raise ImageError(f"remote image larger than {limits.max_image_bytes} bytes (--max-image-bytes)")
            _check_deadline(limits, deadline)
        return response.status, response.getheader("Location"), body
    except (OSError, http.client.HTTPException) as error:
        raise ImageError(f"fetching the image failed ({type(error).__name__})") from None
    finally:
        conn.close()


def fetch_remote(url: str, limits: ImageLimits, deadline: float) -> bytes:
    """GET an image over http(s) from public addresses only, following at most max_redirects redirects, by
    `deadline` (time.monotonic(); the request's, shared by its images)."""
    for _ in range(limits.max_redirects + 1):
        _check_deadline(limits, deadline)
        status, location, body = _get(url, limits, deadline)
        if status in REDIRECTS and location:
            url = urljoin(url, location)
            continue
        if status != 200:
            raise ImageError(f"the image URL answered HTTP {status}")
        return body
    raise ImageError(f"more than {limits.max_redirects} redirects")


def part_url(part: dict) -> object:
    value = part.get("image_url")
    return value.get("url") if isinstance(value, dict) else value


def read_image(part: dict, limits: ImageLimits, deadline: float):
    """An image part -> a decoded RGB Pillow image; ImageError says what is wrong. deadline: for a remote URL."""
    url = part_url(part)
    if not isinstance(url, str) or not url:
        raise ImageError("expected image_url.url to be a data: or http(s) URL string")
    if url.startswith("data:"):
        data = decode_data_url(url, limits.max_image_bytes)
    elif is_remote(url):
        if not limits.allow_remote:
            raise ImageError("remote image URLs are refused by this server (start it with --allow-remote-images); "
                             "send the image inline as a data: URL")
        data = fetch_remote(url, limits, deadline)
    else:
        raise ImageError(f"unsupported URL scheme {urlsplit(url).scheme!r}; expected data: or http(s)")
    if len(data) > limits.max_image_bytes:
        raise ImageError(f"image larger than {limits.max_image_bytes} bytes (--max-image-bytes)")
    return decode_image(data, limits.max_image_pixels)


def is_remote(url: object) -> bool:
    """Whether url is an http(s) URL (fetched only with --allow-remote-images)."""
    return isinstance(url, str) and urlsplit(url).scheme in ("http", "https")


def flatten(messages, vision, limits: ImageLimits) -> tuple[list[dict], list]:
    """Request messages (role already mapped) -> (messages with text content and `<image>` marks, the images).
    A request with remote images holds one of the server's fetch slots while it reads them (429 when none is free)."""
    parts = [part for _, content in messages if isinstance(content, list) for part in content if isinstance(part, dict)]
    remote = limits.allow_remote and any(is_remote(part_url(part)) for part in parts)
    if remote and not limits.fetch_slots.acquire(blocking=False):
        raise APIError(429, f"{limits.max_remote_fetches} requests are fetching remote images already "
                       "(--max-remote-fetches); retry shortly, or send the image inline as a data: URL",
                       param="messages", headers={"Retry-After": "1"})
    try:
        return _flatten(messages, vision, limits, time.monotonic() + limits.fetch_timeout)
    finally:
        if remote:
            limits.fetch_slots.release()


def _flatten(messages, vision, limits: ImageLimits, deadline: float) -> tuple[list[dict], list]:
    token = vision.vision_config.image_token
    plain, images = [], []
    for i, (role, content) in enumerate(messages):
        if not isinstance(content, list):
            if token in (content or ""):
                raise bad_request(f"messages[{i}]: the text may not contain {token!r}", "messages")
            plain.append({"role": role, "content": content or ""})
            continue
        pieces = []
        for j, part in enumerate(content):
            where, kind = f"messages[{i}].content[{j}]", part.get("type")
            if kind == "text" and isinstance(part.get("text"), str) and token not in part["text"]:
                pieces.append(part["text"])
            elif kind in IMAGE_PARTS:
                if len(images) == limits.max_images:
                    raise bad_request(f"{where}: more than {limits.max_images} images in one request "
                                      "(--max-images)", "messages")
                try:
                    images.append(read_image(part, limits, deadline))
                except ImageError as error:
                    raise bad_request(f"{where}: invalid image: {error}", "messages", "invalid_image") from None
                pieces.append(token)
            else:
                raise bad_request(f"{where}: expected a text part (without {token!r}) or an image part "
                                  "(image_url, input_image), got type " + repr(kind), "messages")
        plain.append({"role": role, "content": "\n".join(pieces)})
    return plain, images


@torch.inference_mode()
def embed_prompt(vision, tokenizer, rendered: str, images: list) -> tuple[list[int], torch.Tensor | None]:
    """The rendered chat text -> (prompt ids, image positions as the pad token; inputs_embeds [T, D] or None)."""
    config = vision.vision_config
    ids = expand_images(tokenizer, rendered, config)
    if not images:
        return ids, None
    tensor = torch.tensor([ids], device=vision.projector.fc1.weight.device)
    embeds = vision.embed(tensor, vision.pixels(images))[0]
    pad = tokenizer.pad_token_id or 0
    return [pad if t == config.image_token_id else t for t in ids], embeds
