"""`dsv3 serve` with a vision-language model: image_url / input_image parts through the openai SDK (the same answer
as dsv3.vision.chat in-process), usage counting image tokens, and 30+ bad images, each a 400 in OpenAI's shape
naming the part, with the server healthy after each (dsv3/server/images.py)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import openai
import pytest
import torch
from PIL import Image

from dsv3 import Tokenizer, load_pretrained
from dsv3.server import build_app
from dsv3.vision import VisionConfig, VisionLanguageModel, load_vl, save_vl
from dsv3.vision.chat import chat
from server_utils import KEY, MODEL_NAME, ServerThread, make_model_dir
from server_utils import server_options as options

MAX_PIXELS = 512 * 512
MAX_BYTES = 64 << 10


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vl")
    lm_dir = make_model_dir(root / "lm")
    torch.manual_seed(0)
    config = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_token_id=8192, language_model="../lm")
    return save_vl(VisionLanguageModel(load_pretrained(lm_dir), config), root / "vl", tokenizer_dir=lm_dir)


@pytest.fixture(scope="module")
def server(vl_dir):
    srv = ServerThread(build_app(options(vl_dir, rate_limit=10_000, max_images=2, max_image_bytes=MAX_BYTES,
                                         max_image_pixels=MAX_PIXELS)))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def encoded(size=(24, 24), colour=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, then an IDAT of one byte (too short for any size) and
    IEND: a bomb's header, or a 1x1 image whose data is missing."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def image_part(u, kind="image_url"):
    return {"type": "image_url", "image_url": {"url": u}} if kind == "image_url" else {"type": kind, "image_url": u}


def ask(parts, text="What colour is the shape?"):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


# ---------------------------------------------------------------------------------------------- good images
def test_sdk_image_part_matches_in_process_chat(vl_dir, client):
    messages = ask([image_part(url(encoded()))])
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0)
    vl = load_vl(vl_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(vl_dir)
    assert reply.choices[0].message.content == chat(vl, tokenizer, messages, max_new_tokens=6)
    text_only = tokenizer.apply_chat_template([{"role": "user", "content": "\nWhat colour is the shape?"}],
                                              add_generation_prompt=True)
    image_tokens = vl.vision_config.tokens_per_image
    assert reply.usage.prompt_tokens == len(text_only) + image_tokens  # image tokens count in prompt_tokens


def test_bundled_vl_model_answers_through_the_sdk_as_in_process():
    """The issue's acceptance: `dsv3 serve` on the shipped VL model gives dsv3.generate's answers (through
    vision.chat, the same prompt the server builds), here on ten held-out VQA examples, two of each type."""
    import dsv3
    from dsv3.vision import data

    path = dsv3.bundled_model_path("vl")
    vl, tokenizer = load_vl(path, dtype=torch.float32), Tokenizer.from_pretrained(path)
    srv = ServerThread(build_app(options(path)))
    try:
        sdk = openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0)
        right = 0
        for ex in (data.example(i, "heldout") for i in range(10)):
            buf = io.BytesIO()
            ex.image.save(buf, format="PNG")
            messages = ask([image_part(url(buf.getvalue()))], ex.question)
            served = sdk.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0)
            answer = served.choices[0].message.content
            assert answer == chat(vl, tokenizer, messages, max_new_tokens=4), ex.question
            right += answer == ex.answer
        assert right >= 8
    finally:
        srv.stop()


@pytest.mark.parametrize("fmt, mime, kind", [("JPEG", "image/jpeg", "image_url"), ("WEBP", "image/webp", "image_url"),
                                             ("PNG", "image/png", "input_image")])
def test_formats_and_input_image_parts(client, fmt, mime, kind):
    reply = client.chat.completions.create(model=MODEL_NAME, max_tokens=2,
                                           messages=ask([image_part(url(encoded(fmt=fmt), mime), kind)]))
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_two_images_and_a_text_only_turn(client):
    two = ask([image_part(url(encoded())), image_part(url(encoded(colour=(0, 0, 255))))])
    assert client.chat.completions.create(model=MODEL_NAME, messages=two, max_tokens=2).choices
    plain = [{"role": "user", "content": "hello"}]
    assert client.chat.completions.create(model=MODEL_NAME, messages=plain, max_tokens=2).choices


# ---------------------------------------------------------------------------------------------- bad images
PNG = encoded()


def noisy(fmt: str) -> bytes:
    """A 64x64 image of pseudo-random pixels: its compressed data is long enough to cut in the middle."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3))).save(buf, format=fmt)
    return buf.getvalue()


NOISY, NOISY_JPEG = noisy("PNG"), noisy("JPEG")
LOCAL = [("http://127.0.0.1:9/x.png", "non-public"), ("http://localhost/x.png", "non-public"),
         ("http://10.0.0.1/x.png", "non-public"), ("http://192.168.1.1/x.png", "non-public"),
         ("http://169.254.169.254/latest/meta-data", "non-public"), ("http://[::1]/x.png", "non-public"),
         ("http://0.0.0.0/x.png", "non-public"), ("https://100.64.0.1/x.png", "non-public"),
         ("http://host.invalid/x.png", "cannot resolve")]
BAD = [
    (url(PNG[:40]), "corrupt or truncated|cannot identify"),
    (url(NOISY[:len(NOISY) // 2]), "corrupt or truncated"),
    (url(NOISY_JPEG[:len(NOISY_JPEG) // 2], "image/jpeg"), "corrupt or truncated"),
    (url(encoded(fmt="JPEG")[:200], "image/jpeg"), "cannot identify"),
    (url(encoded(fmt="WEBP")[:30], "image/webp"), "corrupt or truncated|cannot identify"),
    ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),      # bad padding
    ("data:image/png;base64,", "cannot identify"),
    ("data:image/png,rawbytes", "expected a data:image"),
    ("data:text/plain;base64,aGVsbG8=", "expected a data:image"),
    (url(b"hello world"), "cannot identify"),
    (url(png_header(20000, 20000)), "too large"),
    (url(png_header(1, 1)), "corrupt or truncated"),
    (url(png_header(0, 5)), "cannot identify|no pixels"),
    (url(encoded(fmt="GIF"), "image/gif"), "unsupported image format GIF"),
    (url(encoded(fmt="BMP"), "image/bmp"), "unsupported image format BMP"),
    (url(encoded(fmt="TIFF"), "image/tiff"), "unsupported image format TIFF"),
    (url(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml"), "cannot identify"),
    (url(encoded((600, 600))), "too large"),
    (url(bytes(MAX_BYTES + 10)), "larger than"),
    ("http://example.com/cat.png", "remote image URLs are refused"),
    ("https://example.com/cat.png", "remote image URLs are refused"),
    ("ftp://example.com/cat.png", "unsupported URL scheme"),
    ("file:///etc/passwd", "unsupported URL scheme"),
    ("", "expected image_url.url"),
]


@pytest.mark.parametrize("image_url, reason", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_image_is_400_naming_the_part(server, client, image_url, reason):
    expect_400(server, client, ask([{"type": "text", "text": "look:"}, image_part(image_url)]),
               r"messages\[0\]\.content\[1\]: invalid image: .*(" + reason + ")")


@pytest.mark.parametrize("image_url, reason", LOCAL, ids=[u for u, _ in LOCAL])
def test_private_addresses_refused_when_remote_allowed(server, client, image_url, reason):
    server.app.state.dsv3.image_limits.allow_remote = True
    try:
        expect_400(server, client, ask([image_part(image_url)]), r"content\[0\]: invalid image: .*" + reason)
    finally:
        server.app.state.dsv3.image_limits.allow_remote = False


def test_remote_fetches_are_capped_server_wide_and_share_one_deadline(server):
    """With every fetch slot taken, a request with a remote image gets a 429 at once (no thread waits on a slow host)
    while data: images are still served; a request's remote images share one deadline."""
    from dsv3.server.images import ImageLimits, fetch_remote
    from dsv3.vision.preprocess import ImageError

    limits = server.app.state.dsv3.image_limits
    body = {"model": MODEL_NAME, "max_tokens": 2, "messages": ask([image_part("https://example.com/cat.png")])}
    headers = {"Authorization": f"Bearer {KEY}"}
    limits.allow_remote = True
    taken = [limits.fetch_slots.acquire(blocking=False) for _ in range(limits.max_remote_fetches)]
    try:
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
        assert "requests are fetching remote images already (--max-remote-fetches)" in reply.json()["error"]["message"]
        inline = {**body, "messages": ask([image_part(url(PNG))])}
        assert httpx.post(server.url + "/v1/chat/completions", json=inline, headers=headers, timeout=60).is_success
    finally:
        limits.allow_remote = False
        for _ in taken:
            limits.fetch_slots.release()
    with pytest.raises(ImageError, match="remote images took longer than 10 s in all"):
        fetch_remote("https://example.com/cat.png", ImageLimits(allow_remote=True), deadline=0.0)
    with pytest.raises(ValueError, match="max_remote_fetches must be an integer >= 1"):
        ImageLimits(max_remote_fetches=0)


@pytest.mark.parametrize("content, reason", [
    ([image_part(url(PNG))] * 3, r"content\[2\]: more than 2 images"),
    ([{"type": "image_url"}], r"content\[0\]: invalid image: expected image_url.url"),
    ([{"type": "input_image", "image_url": 42}], r"content\[0\]: invalid image: expected image_url.url"),
    ([{"type": "text", "text": "a <image> b"}], r"content\[0\]: expected a text part \(without '<image>'\)"),
    ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}], r"content\[0\]: .*'input_audio'"),
    ([{"type": "file", "file": {"file_id": "x"}}], r"content\[0\]: .*'file'"),
])
def test_bad_parts_are_400(server, client, content, reason):
    expect_400(server, client, [{"role": "user", "content": content}], reason)


def expect_400(server, client, messages, pattern):
    with pytest.raises(openai.BadRequestError, match=pattern) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2)
    assert set(error.value.body) >= {"message", "type", "param", "code"}
    assert error.value.body["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health").status_code == 200


def test_serve_flags_are_checked(vl_dir):
    with pytest.raises(SystemExit, match="--max-images must be an integer >= 1"):
        build_app(options(vl_dir, max_images=0))
    with pytest.raises(SystemExit, match="--max-remote-fetches must be an integer >= 1, got 0"):
        build_app(options(vl_dir, max_remote_fetches=0))
    with pytest.raises(SystemExit, match="--quantize: not supported for a vision-language model"):
        build_app(options(vl_dir, quantize="int8"))


def test_engine_image_prompts_skip_the_prefix_cache(vl_dir):
    """Two prompts with the same ids (the placeholders as pad) but different images: the second must not reuse the
    first's cached blocks. Each result equals dsv3.generate's greedy continuation with that image."""
    from dsv3 import SamplingParams, generate
    from dsv3.engine import Engine, EngineConfig, Request
    from dsv3.server.images import embed_prompt
    from dsv3.vision.prompt import expand_images
    from server_utils import run_engine

    vl = load_vl(vl_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(vl_dir)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n" + "What is it? " * 8}],
                                             add_generation_prompt=True, tokenize=False)
    placeholders = expand_images(tokenizer, rendered, vl.vision_config)
    engine = Engine(vl.language_model, tokenizer, EngineConfig(max_batch=2, max_seq_len=128, block_size=4))
    for colour in ((250, 0, 0), (0, 0, 250)):
        image = Image.new("RGB", (32, 32), colour)
        ids, embeds = embed_prompt(vl, tokenizer, rendered, [image])
        result = run_engine(engine, [Request(ids, SamplingParams(max_new_tokens=6), inputs_embeds=embeds,
                                             ignore_eos=True)])[0]
        assert result.usage.cached_tokens == 0
        want = generate(vl, torch.tensor([placeholders]), 6, images=[image])[0, len(placeholders):].tolist()
        assert result.token_ids == want
