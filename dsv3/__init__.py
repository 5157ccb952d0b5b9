"""dsv3: DeepSeek-V3 in readable PyTorch."""

from .cache import KVCache
from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig
from .generation import generate, stream_generate
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["KVCache", "ModelConfig", "SamplingParams", "Tokenizer", "Transformer", "generate", "load_pretrained",
           "save_pretrained", "stream_generate"]
