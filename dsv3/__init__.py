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


def bundled_model_path() -> Path:
    """Directory of the small DeepSeek-V3-architecture model shipped inside the package (hub layout + tokenizer)."""
    path = Path(__file__).parent / "bundled"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: the bundled model's weights are missing; rebuild them with "
                                "scripts/build_bundled.sh (see its README)")
    return path
