"""dsv3: DeepSeek-V3 in readable PyTorch."""

from pathlib import Path

from .cache import KVCache
from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig
from .generation import generate, stream_generate
from .model import Transformer
from .quant import quantize
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["KVCache", "ModelConfig", "SamplingParams", "Tokenizer", "Transformer", "bundled_model_path", "generate",
           "load_pretrained", "quantize", "save_pretrained", "stream_generate"]


def bundled_model_path(kind: str = "text") -> Path:
    """Directory of a small model shipped inside the package (hub layout + tokenizer): "text", the
    DeepSeek-V3-architecture language model, or "vl", the vision-language model built on it (docs/vision.md)."""
    if kind not in ("text", "vl"):
        raise ValueError(f"bundled_model_path: kind must be 'text' or 'vl', got {kind!r}")
    path = Path(__file__).parent / "bundled"
    path, script = (path, "build_bundled.sh") if kind == "text" else (path / "vl", "build_vl.sh")
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: the bundled model's weights are missing; rebuild them with "
                                f"scripts/{script} (see its README)")
    return path
