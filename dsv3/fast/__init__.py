"""Speed that needs the compiler, kept beside the model: compiled decode/prefill steps, static caches, CUDA graphs,
the CPU decode step's compiler (matvec.py), the weights' storage order for CPU matrix-vector products
(layout.py: `arrange`), and the compiled forms of the MoE, MLP, RMSNorm and RoPE (`prepare`).
The model modules hold the architecture only.

    model = dsv3.fast.prepare(model)                    # idempotent; eager results are unchanged
    step = dsv3.fast.compiled_decode_step("cpu")        # step(model, tokens [B], cache, pos [B]) -> logits [B, V]

`dsv3.generate(..., compile=True)` and `Engine(..., EngineConfig(compile=True))` do both.
"""

from .layout import arrange
from .steps import compiled_decode_step, compiled_prefill, mark_static_cache, prepare, static_step, unguarded

__all__ = ["arrange", "compiled_decode_step", "compiled_prefill", "mark_static_cache", "prepare", "static_step",
           "unguarded"]
