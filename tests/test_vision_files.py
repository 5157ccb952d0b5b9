"""Bad vision inputs get one clear line, never a raw Pillow/torch/safetensors/json error or a silently wrong result:
16-bit, 32-bit and float images (dsv3/vision/preprocess.py to_rgb), transparent pixels (composited onto white, as
transformers' convert_to_rgb does), truncated lazily opened images, and broken VL checkpoint directories for load_vl
(config.json's "vision" section, model.safetensors' keys, shapes, dtypes)."""

import io
import json
import math
import os
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dsv3 import ModelConfig, Transformer, save_pretrained
from dsv3.lora import apply_lora
from dsv3.vision import ImageError, VisionConfig, VisionLanguageModel, decode_image, load_vl, save_vl, to_pixels
from dsv3.vision.preprocess import to_rgb

VOCAB = 128
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, image_token_id=VOCAB)


def png(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **options)
    return buf.getvalue()


@pytest.mark.parametrize("level, grey", [(32768, 128), (1000, 4), (65535, 255), (0, 0)])
def test_16_bit_png_is_scaled_to_8_bits_not_clipped(level, grey):
    data = png(Image.new("I;16", (8, 8), level))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert decode_image(data).getpixel((0, 0)) == (grey, grey, grey)
    pixels = to_pixels(Image.open(io.BytesIO(data)), 16)  # a PIL image from Python takes the same path
    torch.testing.assert_close(pixels[:, 8, 8], torch.full((3,), grey / 127.5 - 1))


@pytest.mark.parametrize("mode, value", [("F", 0.5), ("I", 1000)])
def test_int_and_float_images_are_refused_not_guessed(mode, value):
    with pytest.raises(ImageError, match=f"image mode {mode} .* has no known range"):
        to_pixels(Image.new(mode, (8, 8), value), 16)


WHITE, RED, BLUE = (255, 255, 255), (200, 0, 40), (0, 0, 255)


@pytest.mark.parametrize("transparency", [0, bytes([0, 255, 255])], ids=["index", "per-index-alpha"])
def test_transparent_palette_png_on_disk_decodes_white(tmp_path, transparency):
    """Palette index 0 is black and transparent: convert("RGB") alone would show it black."""
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, *RED, *BLUE])
    image.putpixel((1, 0), 1), image.putpixel((2, 1), 2)
    path = tmp_path / "palette.png"
    image.save(path, transparency=transparency)
    decoded = decode_image(path.read_bytes())  # what dsv3 serve and dsv3.vision.chat call on image bytes
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == WHITE and decoded.getpixel((3, 1)) == WHITE
    assert decoded.getpixel((1, 0)) == RED and decoded.getpixel((2, 1)) == BLUE


def blend(colour, alpha):
    return tuple(round((c * alpha + 255 * (255 - alpha)) / 255) for c in colour)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_half_transparent_pixels_blend_onto_white(mode):
    colour = RED if mode != "LA" else (90, 90, 90)
    if mode == "PA":
        image = Image.new("PA", (2, 2), (1, 128))
        image.putpalette([0, 0, 0, *colour])
    else:
        image = Image.new(mode, (2, 2), (*colour, 128) if mode == "RGBA" else (colour[0], 128))
    image.putpixel((1, 1), (1, 255) if mode == "PA" else (*colour, 255) if mode == "RGBA" else (colour[0], 255))
    decoded = to_rgb(image) if mode == "PA" else decode_image(png(image))  # Pillow cannot write PA as PNG
    expected = blend(colour, 128)  # (200, 0, 40) -> (228, 127, 147)
    assert all(abs(a - b) <= 1 for a, b in zip(decoded.getpixel((0, 0)), expected)), decoded.getpixel((0, 0))
    assert decoded.getpixel((1, 1)) == colour
    x = to_pixels(image, 2)[:, 0, 0]  # a PIL image from Python takes the same path
    torch.testing.assert_close(x, torch.tensor(expected) / 127.5 - 1, atol=1 / 127.5, rtol=0)


@pytest.mark.parametrize("mode, key, opaque", [("L", 10, (200,) * 3), ("RGB", (1, 2, 3), (200, 0, 0)),
                                               ("I;16", 40000, (156,) * 3)])
def test_png_trns_colour_key_is_transparent(mode, key, opaque):
    """A tRNS chunk on a greyscale / RGB PNG makes one level transparent; 16-bit levels are compared before scaling."""
    image = Image.new(mode, (3, 1), key)
    image.putpixel((1, 0), opaque if mode == "RGB" else {"L": 200, "I;16": 40000 - 1}[mode])
    decoded = decode_image(png(image, transparency=key))
    assert [decoded.getpixel((x, 0)) for x in range(2)] == [WHITE, opaque]


def test_truncated_lazily_opened_image_is_an_image_error():
    data = png(Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)))
    with pytest.raises(ImageError, match=r"^corrupt or truncated PNG data \(OSError\)$"):
        to_pixels(Image.open(io.BytesIO(data[:len(data) // 2])), 16)


@pytest.mark.parametrize("overrides, message", [
    ({"lora_alpha": "32"}, "vision.lora_alpha: expected a finite number"),
    ({"lora_alpha": math.nan}, "vision.lora_alpha: expected a finite number"),
    ({"lora_rank": 4, "lora_alpha": 0.0}, "vision.lora_alpha: expected a positive finite number when lora_rank > 0"),
    ({"layer_norm_eps": True}, "vision.layer_norm_eps: expected a positive finite number"),
    ({"image_newline": "no"}, "vision.image_newline: expected true or false"),
    ({"num_channels": 1}, "vision.num_channels: expected 3"),
    ({"image_token": ""}, "vision.image_token: expected a non-empty string"),
    ({"language_model": None}, "vision.language_model: expected a non-empty string"),
    ({"image_token_id": 1.5}, "vision.image_token_id: expected an integer >= 0"),
    ({"lora_rank": True}, "vision.lora_rank: expected an integer >= 0"),
    ({"lora_targets": ["o_proj", 3]}, "vision.lora_targets: expected a list of module names"),
])
def test_every_config_field_is_type_and_range_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig(**{**VISION, **overrides})


def test_lora_alpha_is_free_without_lora():
    """`dsv3 train-vl --lora-rank 0` writes lora_alpha 2 x 0: a VL model without LoRA deltas loads."""
    assert VisionConfig(**{**VISION, "lora_rank": 0, "lora_alpha": 0.0}).lora_alpha == 0.0


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    """A tiny saved VL model with LoRA factors; its language_model is absolute so copies of it load anywhere."""
    root = tmp_path_factory.mktemp("vl")
    torch.manual_seed(0)
    lm = Transformer(ModelConfig.tiny(vocab_size=VOCAB))
    save_pretrained(lm, root / "lm", dtype=torch.float32)
    apply_lora(lm, 4, 8.0, ["o_proj"], include_mtp=False)
    config = VisionConfig(**VISION, language_model=str(root / "lm"), lora_rank=4, lora_alpha=8.0,
                          lora_targets=["o_proj"])
    return save_vl(VisionLanguageModel(lm, config), root / "vl")


def edit_config(**vision):
    def edit(d):
        config = json.loads((d / "config.json").read_text())
        config["vision"].update(vision)
        (d / "config.json").write_text(json.dumps(config))  # NaN is written as JSON's NaN, which json reads back
    return edit


def edit_tensor(prefix, change):
    def edit(d):
        tensors = load_file(d / "model.safetensors")
        key = next(k for k in sorted(tensors) if k.startswith(prefix))
        tensors[key] = change(tensors[key]).contiguous()
        save_file(tensors, d / "model.safetensors")
    return edit


def truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("edit, file, message", [
    (lambda d: (d / "config.json").write_text("{not json"), "config.json", "not a readable JSON file"),
    (edit_config(lora_alpha="32"), "config.json", "vision.lora_alpha: expected a finite number"),
    (edit_config(lora_alpha=math.nan), "config.json", "vision.lora_alpha: expected a finite number"),
    (edit_config(image_newline="no"), "config.json", "vision.image_newline: expected true or false"),
    (edit_config(num_channels=1), "config.json", "vision.num_channels: expected 3"),
    (edit_config(lora_targets=["nope_proj"]), "config.json", r"vision.lora_targets: \['nope_proj'\] are not linear"),
    (edit_config(language_model="no-such-dir"), "config.json", "vision.language_model: no directory"),
    (edit_tensor("vision.", lambda t: t[:-1]), "model.safetensors", r"vision\.\S+ has shape \["),
    (edit_tensor("language_model.", lambda t: t[:, :-1]), "model.safetensors",
     r"language_model\.\S+\.lora_A has shape \["),
    (edit_tensor("vision.", lambda t: (t * 100).to(torch.int16)), "model.safetensors", "has dtype int16"),
    (truncate, "model.safetensors", "truncated or corrupt safetensors file"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors", "missing; expected the VL weights"),
], ids=["not-json", "alpha-str", "alpha-nan", "newline-str", "channels-1", "targets-unknown", "lm-missing",
        "vision-shape", "lora-shape", "int16", "truncated", "no-weights"])
def test_broken_vl_checkpoint_is_one_line_naming_the_file(vl_dir, tmp_path, edit, file, message):
    d = shutil.copytree(vl_dir, tmp_path / "vl")
    edit(d)
    with pytest.raises(ValueError) as info:
        load_vl(d)
    text = str(info.value)
    assert text.startswith(f"{d / file}: ") and "\n" not in text, text
    assert re.search(message, text), text


def test_intact_copy_loads(vl_dir, tmp_path):
    """The checks pass a good checkpoint."""
    assert load_vl(shutil.copytree(vl_dir, tmp_path / "vl")).vision_config.lora_rank == 4
