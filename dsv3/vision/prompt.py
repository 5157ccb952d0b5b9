"""Chat messages with image parts -> token ids with image placeholders, and the images in order.

A user message's content may be a string or OpenAI content parts ({"type": "text", "text"}, {"type": "image_url",
"image_url": {"url"}}, {"type": "input_image", "image_url"}); here the images are already-decoded Pillow images
(the server decodes and checks the URLs first: dsv3/server/images.py). Parts join with "\n", as the text-only
server does, each image as the config's `<image>` text; the chat template is rendered, and the text is tokenised
around each `<image>`, which becomes tokens_per_image copies of image_token_id.
"""

from __future__ import annotations

from PIL import Image

from .config import VisionConfig

IMAGE_PARTS = ("image_url", "input_image", "image")


def flatten_content(content, where: str, image_token: str) -> tuple[str, list]:
    """One message's content -> (text with image_token at each image, the image parts' payloads in order)."""
    if isinstance(content, str) or content is None:
        return content or "", []
    pieces, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in IMAGE_PARTS:
            pieces.append(image_token)
            images.append(part.get("image", part.get("image_url")))
        else:
            raise ValueError(f"{where}.content[{j}]: expected a text or image part, got type {kind!r}")
    return "\n".join(pieces), images


def expand_images(tokenizer, text: str, config: VisionConfig) -> list[int]:
    """Rendered prompt text -> ids; each image_token becomes tokens_per_image x image_token_id."""
    pieces = text.split(config.image_token)
    ids = tokenizer.encode(pieces[0], add_special_tokens=False)
    for piece in pieces[1:]:
        ids += [config.image_token_id] * config.tokens_per_image
        ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def chat_ids(tokenizer, messages: list[dict], config: VisionConfig) -> tuple[list[int], list[Image.Image]]:
    """Messages (content parts may carry Pillow images as {"type": "image", "image": img}) -> (prompt ids with the
    assistant prompt, the images in order)."""
    plain, images = [], []
    for i, m in enumerate(messages):
        text, found = flatten_content(m.get("content"), f"messages[{i}]", config.image_token)
        plain.append({"role": m["role"], "content": text})
        images += found
    for k, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"image {k}: expected a decoded PIL.Image, got {type(image).__name__}")
    rendered = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return expand_images(tokenizer, rendered, config), images
