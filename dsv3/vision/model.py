"""VisionLanguageModel: DeepSeek-VL2's LLaVA-style wiring (arXiv:2412.10302 §2) around a dsv3 Transformer.

input_ids [B, T] hold `image_token_id` at each image position (tokens_per_image of them per image, in order);
`embed` puts the projected image embeddings [tokens_per_image, D] there and the LM's token embeddings elsewhere,
and the Transformer runs on those inputs_embeds [B, T, D]. Only the prefill sees images: after it the KV cache holds
everything, and decoding feeds text tokens to the plain Transformer (generation, cache, engine unchanged).

On disk (HF layout, docs/vision.md §2): config.json {"model_type": "dsv3_vl", "vision": {...}}, model.safetensors
with `vision.*`, `projector.*` and the LM's LoRA factors `language_model.*.lora_A/B`, the tokenizer files. The base
LM's weights are read from `vision.language_model` (a directory relative to this one) and the LoRA merged into them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import load_pretrained
from ..hub import CheckpointError, check_dtype, read_tensors
from ..lora import apply_lora, lora_modules, merge_and_unload
from ..model import Transformer
from .config import VisionConfig, read_config
from .encoder import VisionEncoder
from .preprocess import to_pixels
from .projector import Projector

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class VisionLanguageModel(nn.Module):
    def __init__(self, language_model: Transformer, config: VisionConfig, embed_rms: float | None = None) -> None:
        """embed_rms: the projector's starting output scale; by default the RMS of the LM's token embeddings."""
        super().__init__()
        if config.image_token_id < language_model.config.vocab_size:
            raise ValueError(f"vision.image_token_id: {config.image_token_id} is a text token; expected an id >= "
                             f"the LM's vocab_size {language_model.config.vocab_size}")
        if embed_rms is None:
            embed_rms = language_model.model.embed_tokens.weight.detach().float().pow(2).mean().sqrt().item()
        self.language_model = language_model
        self.vision_config = config
        self.vision = VisionEncoder(config)
        self.projector = Projector(config, language_model.config.hidden_size, embed_rms,
                                   language_model.config.rms_norm_eps)

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] -> [N, tokens_per_image, D] in the LM's dtype."""
        dtype = self.language_model.lm_head.weight.dtype
        return self.projector(self.vision(pixels.to(self.projector.fc1.weight.dtype))).to(dtype)

    def pixels(self, images) -> torch.Tensor:
        """Pillow images (a list) or pixels [N, 3, S, S] -> pixels [N, 3, S, S] on the encoder's device."""
        device = self.projector.fc1.weight.device
        if isinstance(images, torch.Tensor):
            return images.to(device)
        size = self.vision_config.image_size
        if not images:
            return torch.zeros(0, 3, size, size, device=device)
        return torch.stack([to_pixels(image, size) for image in images]).to(device)

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T], pixels [N, 3, S, S] (images in reading order) -> inputs_embeds [B, T, D]."""
        is_image = input_ids == self.vision_config.image_token_id
        h = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        found = int(is_image.sum())
        per = self.vision_config.tokens_per_image
        expected = 0 if pixels is None else pixels.shape[0] * per
        if found != expected:
            raise ValueError(f"input_ids hold {found} image placeholders; expected {expected} "
                             f"({0 if pixels is None else pixels.shape[0]} images x {per} tokens)")
        if not expected:
            return h
        h = h.clone()
        h[is_image] = self.image_embeddings(pixels).flatten(0, 1)
        return h

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None, cache=None, start_pos=0,
                **kwargs) -> torch.Tensor:
        """Logits [B, T, V] (see Transformer.forward for cache, start_pos and the keyword arguments)."""
        return self.language_model(None, cache, start_pos, inputs_embeds=self.embed(input_ids, pixels), **kwargs)


def _vl_tensors(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    tensors = {f"vision.{k}": v for k, v in model.vision.state_dict().items()}
    tensors.update({f"projector.{k}": v for k, v in model.projector.state_dict().items()})
    for name, m in lora_modules(model.language_model).items():
        tensors[f"language_model.{name}.lora_A"] = m.lora_A
        tensors[f"language_model.{name}.lora_B"] = m.lora_B
    return {k: v.detach().float().contiguous() for k, v in tensors.items()}


def save_vl(model: VisionLanguageModel, path: str | Path, tokenizer_dir: str | Path | None = None,
            dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors (vision, projector, LoRA factors in `dtype`: float32 for training
    checkpoints, bfloat16 for the bundle, half the bytes) and the tokenizer files. load_vl reads either."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["DsV3VisionLanguageModel"], "model_type": "dsv3_vl",
              "vision": model.vision_config.to_dict()}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.to(dtype) for k, v in _vl_tensors(model).items()}, str(path / WEIGHTS))
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        shutil.copyfile(Path(tokenizer_dir) / name, path / name)
    return path


def is_vl_model(path: str | Path) -> bool:
    """Whether `path`/config.json has a "vision" section."""
    config = Path(path) / "config.json"
    return config.exists() and "vision" in read_config(config)


def _checked_tensors(file: Path, model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """`file`'s tensors, refused in one line naming the file and key unless they are exactly the model's VL tensors
    (vision, projector, LoRA factors) in shape, and floating point (an int16 weight would load silently)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; expected the VL weights (vision, projector, LoRA factors)")
    tensors = {key: tensor for key, tensor, _ in read_tensors([file])}
    expected = _vl_tensors(model)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CheckpointError(f"{file}: tensors do not match the config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{file}: {key} has shape {list(tensor.shape)}, expected "
                                  f"{list(expected[key].shape)} (from config.json's vision section)")
        check_dtype(file, key, tensor, torch.float32)
    return tensors


def load_vl(path: str | Path, dtype: torch.dtype | None = None, device=None, *,
            merge: bool = True) -> VisionLanguageModel:
    """A saved VL model in eval mode, frozen. merge: fold the LoRA factors into the LM (a plain Transformer again,
    for inference); merge=False keeps them as LoRALinear modules (resuming training)."""
    path = Path(path)
    config, config_file = VisionConfig.from_model_dir(path), path / "config.json"
    if not (path / config.language_model).is_dir():
        raise ValueError(f"{config_file}: vision.language_model: no directory {path / config.language_model}; "
                         "expected the base LM's directory, relative to this one")
    lm = load_pretrained(path / config.language_model, dtype=dtype, device=device)
    try:  # the config's values against the LM: LoRA targets that exist, an image token outside the vocabulary
        if config.lora_rank:
            apply_lora(lm, config.lora_rank, config.lora_alpha, config.lora_targets, include_mtp=False)
        model = VisionLanguageModel(lm, config, embed_rms=1.0)
    except ValueError as e:  # apply_lora names its argument target_modules; the file calls it vision.lora_targets
        raise ValueError(f"{config_file}: {str(e).replace('target_modules:', 'vision.lora_targets:')}") from None
    tensors = _checked_tensors(path / WEIGHTS, model)
    model.vision.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("vision.")})
    model.projector.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("projector.")})
    lm.load_state_dict({k[15:]: v for k, v in tensors.items() if k.startswith("language_model.")}, strict=False)
    if merge:
        merge_and_unload(lm)
    model.vision.to(device=device, dtype=dtype or torch.float32)
    model.projector.to(device=device, dtype=dtype or torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
