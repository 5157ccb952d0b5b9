"""dsv3: DeepSeek-V3 in readable PyTorch."""

from .cache import KVCache
from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig
from .model import Transformer
from .tokenizer import Tokenizer

__all__ = ["KVCache", "ModelConfig", "Transformer", "load_pretrained", "save_pretrained", "Tokenizer"]
