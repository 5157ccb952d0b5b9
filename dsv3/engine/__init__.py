"""Inference engine: continuous batching, prefix cache, cancellation, per-request sampling (nano-vllm's layout:
scheduler.py decides who runs, prefix_cache.py keeps shared prompt blocks, engine.py runs the model)."""

from .engine import Engine, EngineConfig
from .prefix_cache import PrefixCache
from .request import ContextLengthError, Delta, QueueFullError, Request, RequestHandle, Result, TokenLogprob, Usage

__all__ = ["ContextLengthError", "Delta", "Engine", "EngineConfig", "PrefixCache", "QueueFullError", "Request",
           "RequestHandle", "Result", "TokenLogprob", "Usage"]
