"""Bad vision inputs get one clear line, never a raw Pillow/torch/safetensors/json error or a silently wrong result:
16-bit, 32-bit and float images (dsv3/vision/preprocess.py to_rgb), truncated lazily opened images, and broken VL
checkpoint directories for load_vl (config.json's "vision" section, model.safetensors' keys, shapes, dtypes)."""

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

VOCAB = 128
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, image_token_id=VOCAB)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
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
