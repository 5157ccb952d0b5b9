"""VisionConfig: the "vision" section of a VL model's config.json (docs/vision.md §1).

The section sits beside the language model's usual HF fields, so the same file still loads as a text model
(`ModelConfig.from_hf` ignores it). Sizes follow DeepSeek-VL2 (arXiv:2412.10302 §2) in miniature: a SigLIP-layout
ViT over square images, a 2x2 pixel shuffle, then an MLP into the LM's width.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


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

        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "downsample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, "expected a positive integer")
        if self.image_size % self.patch_size:
            bad("image_size", f"expected a multiple of patch_size={self.patch_size}")
        if not isinstance(self.conv_stem, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.conv_stem):
            bad("conv_stem", "expected a list of positive channel counts")
        if self.patch_size % 2 ** len(self.conv_stem):
            bad("conv_stem", f"expected at most as many stride-2 convolutions as patch_size={self.patch_size} "
                f"has factors of 2")
        if self.grid % self.downsample:
            bad("downsample", f"expected a divisor of image_size/patch_size={self.grid}")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"expected a multiple of num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            bad("layer_norm_eps", "expected a positive number")
        if not isinstance(self.image_token_id, int) or self.image_token_id < 0:
            bad("image_token_id", "expected a non-negative integer")
        if not isinstance(self.image_token, str) or not self.image_token:
            bad("image_token", "expected a non-empty string")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            bad("lora_rank", "expected an integer >= 0")
        if not isinstance(self.lora_targets, list) or not all(isinstance(t, str) for t in self.lora_targets):
            bad("lora_targets", "expected a list of module names")

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
        config = json.loads((Path(path) / "config.json").read_text())
        if "vision" not in config:
            raise ValueError(f"{path}/config.json: no 'vision' section: this is a text-only model")
        return cls.from_dict(config["vision"])

    def to_dict(self) -> dict:
        return asdict(self)
