"""VisionConfig: the "vision" section of a VL model's config.json (docs/vision.md §1).

The section sits beside the language model's usual HF fields, so the same file still loads as a text model
(`ModelConfig.from_hf` ignores it). Sizes follow DeepSeek-VL2 (arXiv:2412.10302 §2) in miniature: a SigLIP-layout
ViT over square images, a 2x2 pixel shuffle, then an MLP into the LM's width.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# Each field's lower bound (ints: inclusive, floats: exclusive; for a list, of its items) and what the error says it
# must be. validate looks every field up here, so a new field cannot go unchecked.
_RULES: dict[str, tuple[float | None, str]] = {
    **dict.fromkeys(("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "downsample"), (1, "a positive integer")),
    "conv_stem": (1, "a list of positive channel counts"),
    "layer_norm_eps": (0, "a positive finite number"), "lora_alpha": (-math.inf, "a finite number"),
    "image_newline": (None, "true or false"),
    "image_token_id": (0, "an integer >= 0"), "lora_rank": (0, "an integer >= 0"),
    "image_token": (None, "a non-empty string"), "language_model": (None, "a non-empty string (a directory)"),
    "lora_targets": (None, "a list of module names"),
}


def _fits(value: object, kind: type, low: float | None) -> bool:
    """Whether `value` is a `kind` (int, float, bool or non-empty str) >= low (int) or > low (float). Bools are not
    numbers and floats must be finite: JSON's true, NaN or "32" would otherwise reach the model or a raw TypeError."""
    if kind in (bool, str):
        return isinstance(value, kind) and value != ""
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        return False
    return value >= low if kind is int else (isinstance(value, int) or math.isfinite(value)) and value > low


@dataclass
class VisionConfig:
    image_size: int = 64            # pixels per side after resize-pad
    patch_size: int = 8             # ViT patch (VL2's SigLIP: 14 at 384 px): the total stride of the embedding
    conv_stem: list[int] = field(default_factory=list)  # channels of stride-2 3x3 convolutions before the patch
                                    # projection (a hybrid ViT, encoder.py); empty = SigLIP's one-convolution embedding
    num_channels: int = 3
    hidden_size: int = 128          # ViT width
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    layer_norm_eps: float = 1e-6
    downsample: int = 2             # pixel shuffle factor (VL2 §2: 2x2)
    image_newline: bool = True      # a learned <tile_newline> embedding after each row of image tokens
    image_token_id: int = 8192      # placeholder id in input_ids; outside the text vocabulary on purpose
    image_token: str = "<image>"    # its text form in prompts
    language_model: str = ".."      # directory of the base LM weights, relative to this config's directory
    lora_rank: int = 0              # LoRA rank of the LM deltas stored with the VL weights (0 = LM unchanged)
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def grid(self) -> int:
        """Patches per side: image_size / patch_size."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def tokens_per_image(self) -> int:
        """LM positions one image takes: (grid/downsample)^2 shuffled tokens, plus one newline per row."""
        side = self.grid // self.downsample
        return side * (side + int(self.image_newline))

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"vision.{name}: {why} (got {getattr(self, name)!r})")

        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # each against its annotation and _RULES first, so the checks below see sane values
            (low, what), hint, value = _RULES[f.name], hints[f.name], getattr(self, f.name)
            if typing.get_origin(hint) is list:
                ok = isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0], low) for v in value)
            else:
                ok = _fits(value, hint, low)
            if not ok:
                bad(f.name, f"expected {what}")
        if self.lora_rank and self.lora_alpha <= 0:  # unused without LoRA (train-vl writes 2 x rank: 0 there)
            bad("lora_alpha", "expected a positive finite number when lora_rank > 0")
        if self.num_channels != 3:
            bad("num_channels", "expected 3: images are decoded to RGB")
        if self.image_size % self.patch_size:
            bad("image_size", f"expected a multiple of patch_size={self.patch_size}")
        if self.patch_size % 2 ** len(self.conv_stem):
            bad("conv_stem", f"expected at most as many stride-2 convolutions as patch_size={self.patch_size} "
                f"has factors of 2")
        if self.grid % self.downsample:
            bad("downsample", f"expected a divisor of image_size/patch_size={self.grid}")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"expected a multiple of num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_dict(cls, data: object) -> VisionConfig:
        if not isinstance(data, dict):
            raise ValueError(f"vision: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"vision.{unknown[0]}: unknown field; expected some of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> VisionConfig:
        """The "vision" section of `path`/config.json; a clear error when it has none (a text-only model)."""
        file = Path(path) / "config.json"
        config = read_config(file)
        if "vision" not in config:
            raise ValueError(f"{file}: no 'vision' section: this is a text-only model")
        try:
            return cls.from_dict(config["vision"])
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def read_config(file: Path) -> dict:
    """A VL model's config.json as a dict; a one-line ValueError naming the file for anything but a JSON object."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no config.json here") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # a directory, not UTF-8, not JSON
        raise ValueError(f"{file}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object (got {type(config).__name__})")
    return config
