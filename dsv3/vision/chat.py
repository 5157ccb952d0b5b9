"""`chat`: one assistant reply from a VisionLanguageModel to OpenAI-style messages, as the server takes them.

Image parts are {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} (or "input_image" with
"image_url" a string URL), or {"type": "image", "image": <PIL.Image>} from Python; only data: URLs are read here
(the server alone fetches remote URLs, behind its SSRF checks: dsv3/server/images.py).
"""

from __future__ import annotations

import torch

from ..generation import generate
from .preprocess import decode_data_url, decode_image
from .prompt import IMAGE_PARTS, chat_ids


def _url(part: dict):
    value = part.get("image_url")
    return value.get("url") if isinstance(value, dict) else value


def resolve_images(messages: list[dict], max_pixels: int = 4096 * 4096) -> list[dict]:
    """The messages with every data-URL image part replaced by {"type": "image", "image": <decoded image>}."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in IMAGE_PARTS and "image" not in part:
                    url = _url(part)
                    if not isinstance(url, str) or not url.startswith("data:"):
                        raise ValueError(f"messages[{i}].content[{j}]: expected a data: URL (remote images are "
                                         "fetched by the server only)")
                    part = {"type": "image", "image": decode_image(decode_data_url(url), max_pixels)}
                parts.append(part)
            content = parts
        out.append({**m, "content": content})
    return out


def chat(model, tokenizer, messages: list[dict], max_new_tokens: int = 16, **sampling) -> str:
    """The reply's text (greedy unless sampling arguments of dsv3.generate are given), special tokens dropped."""
    ids, images = chat_ids(tokenizer, resolve_images(messages), model.vision_config)
    prompt = torch.tensor([ids])
    out = generate(model if images else model.language_model, prompt, max_new_tokens,
                   stop_token_ids=[tokenizer.eos_token_id], images=images or None, **sampling)
    return tokenizer.decode(out[0, prompt.shape[1]:].tolist(), skip_special_tokens=True)
