"""The vision path (DeepSeek-VL2 style, docs/vision.md): a SigLIP-layout ViT, the 2x2 pixel-shuffle projector, image
preprocessing, and `VisionLanguageModel`, which puts the projected image embeddings in place of the `<image>`
placeholders before the dsv3 Transformer."""

from .config import VisionConfig
from .encoder import VisionEncoder
from .model import VisionLanguageModel, load_vl, save_vl
from .preprocess import ImageError, decode_image, to_pixels
from .projector import Projector

__all__ = ["ImageError", "Projector", "VisionConfig", "VisionEncoder", "VisionLanguageModel", "decode_image",
           "load_vl", "save_vl", "to_pixels"]
