"""Image bytes -> a checked RGB Pillow image -> normalised pixels [3, S, S].

Resize-pad, as DeepSeek-VL2 does for its global view (arXiv:2412.10302 §2): scale the longer side to S keeping the
aspect ratio, centre on an S x S canvas of mid grey. VL2's dynamic tiling (local 384-px tiles + the global view,
`<view_separator>` between them) is not built: our images are small (docs/vision.md §1).
Any Pillow mode becomes 8-bit RGB (16-bit greyscale scaled down, 32-bit int and float refused, transparent pixels
composited onto white: to_rgb).
Pixels are normalised as SigLIP does: (x/255 - 0.5) / 0.5, so in [-1, 1].
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
import torch
from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP")
PAD = (127, 127, 127)
# modes with an alpha band (La / RGBa: premultiplied); Pillow's Image.has_transparency_data (10.1+) tests the same
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageError(ValueError):
    """An image that cannot be used; the message says why (the server puts it in a 400)."""


def decode_image(data: bytes, max_pixels: int = 4096 * 4096) -> Image.Image:
    """PNG, JPEG or WebP bytes -> a loaded RGB image. The header's size is checked against max_pixels before any
    pixel is decoded (a decompression bomb never expands); truncated or corrupt data raise ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image too large: more than {max_pixels} pixels") from None
    except Exception:  # Pillow raises UnidentifiedImageError, SyntaxError, struct.error... on junk
        raise ImageError("not a PNG, JPEG or WebP image (cannot identify it)") from None
    if image.format not in FORMATS:
        raise ImageError(f"unsupported image format {image.format}; expected PNG, JPEG or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} = {width * height} pixels, limit {max_pixels}")
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> a loaded 8-bit RGB image. 16-bit greyscale (PNG's I;16 modes) is scaled 0..65535 ->
    0..255, as libpng strips 16 bits to 8: Pillow's convert("RGB") clips it instead (1000/65535 turns white).
    32-bit integer (I) and float (F) images carry no agreed range (Pillow's own convert("F") of an 8-bit image gives
    0..255, numpy users expect 0..1), so they are refused rather than guessed. A lazily opened image is loaded here:
    truncated or corrupt data raise ImageError.
    Transparency (an alpha band, ALPHA_MODES, or a `transparency` entry: a PNG/GIF palette's transparent index or
    per-index alphas, a PNG tRNS colour key) is composited onto white, as transformers' image processors do
    (`image_transforms.convert_to_rgb`: convert("RGBA"), alpha_composite over a white RGBA canvas, convert("RGB")):
    convert("RGB") alone drops the alpha and shows whatever colour the transparent pixels hold, often black."""
    try:
        image.load()
    except Exception as e:  # truncated streams: OSError; broken chunks: SyntaxError, ValueError
        raise ImageError(f"corrupt or truncated {image.format or 'image'} data ({type(e).__name__})") from None
    if image.mode in ("I", "F"):
        raise ImageError(f"image mode {image.mode} ({'32-bit integer' if image.mode == 'I' else 'float'} pixels) "
                         "has no known range; expected an 8-bit image (mode L, RGB, RGBA...) or 16-bit greyscale")
    if image.mode.startswith("I;16"):
        image = _sixteen_to_eight(image)
    try:
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError:  # modes Pillow cannot convert, e.g. La
        raise ImageError(f"image mode {image.mode} cannot be converted to RGB") from None


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """I;16 greyscale -> L, levels scaled by 1/257 and rounded; a tRNS level (`transparency`, 16-bit) -> LA, alpha 0
    exactly where the 16-bit level equals it (compared before scaling, which maps 257 levels onto each 8-bit one)."""
    wide = image.convert("I")
    grey = wide.point(lambda v: v / 257 + 0.5).convert("L")  # + 0.5: point truncates
    key = image.info.get("transparency")
    if isinstance(key, int):
        opaque = (np.asarray(wide) != key).astype(np.uint8) * 255
        grey = Image.merge("LA", (grey, Image.fromarray(opaque)))
    return grey


DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+)?(;[^,;]*)*;base64,(.*)", re.S | re.I)


def decode_data_url(url: str, max_bytes: int = 8 << 20) -> bytes:
    """A `data:image/...;base64,...` URL -> its bytes (at most max_bytes; the length is checked before decoding)."""
    match = DATA_URL.fullmatch(url.strip())
    if not match:
        raise ImageError("expected a data:image/<type>;base64,<data> URL")
    payload = match.group(3)
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"image data larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data URL's payload is not valid base64") from None


def resize_pad(image: Image.Image, size: int) -> Image.Image:
    """The longer side to `size` (aspect kept, at least 1 px), centred on a grey size x size canvas."""
    image = to_rgb(image)
    scale = size / max(image.size)
    w, h = (max(1, round(d * scale)) for d in image.size)
    canvas = Image.new("RGB", (size, size), PAD)
    canvas.paste(image.resize((w, h), Image.Resampling.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return canvas


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """A Pillow image -> float32 pixels [3, size, size] in [-1, 1]."""
    canvas = resize_pad(image, size)
    x = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)
