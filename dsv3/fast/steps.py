"""Compiled decode and prefill steps, applied from the outside (as gpt-fast compiles `decode_one_token`).

`prepare(model)` swaps the classes of the model's MLP, MLA, RMSNorm, Gate, MoE, Int8Linear and FP8Linear modules for
subclasses with the compiled forms of dsv3/fast/layers.py and moe.py (eager, they compute exactly what the base
classes do) and builds the MoE's expert stacks, which compiled graphs read but cannot build.
`generate(compile=True)` and `Engine(compile=True)` call it; so does anyone who runs `torch.compile(model)`
themselves.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from ..attention import MLA
from ..layers import MLP, RMSNorm
from ..moe import Gate, MoE
from ..quant.fp8 import FP8Linear
from ..quant.int8 import Int8Linear
from .layers import CastFP8, FewRowInt8, FusedRMSNorm, RealRope, StoredHidden
from .matvec import cpu_decode_backend
from .moe import ArgmaxGate, CompiledMoE

MIXINS = ((MLP, StoredHidden), (MLA, RealRope), (RMSNorm, FusedRMSNorm), (Gate, ArgmaxGate), (MoE, CompiledMoE),
          (Int8Linear, FewRowInt8), (FP8Linear, CastFP8))


@functools.cache
def _with_mixin(cls: type, mixin: type) -> type:
    """cls with mixin's overrides first, under cls's name (the model prints as before)."""
    return type(cls.__name__, (mixin, cls), {"__module__": __name__})


@torch.no_grad()
def prepare(model: nn.Module) -> nn.Module:
    """Give `model`'s modules their compiled forms (in place; idempotent) and build the MoE's expert stacks now,
    eagerly: without them a compiled graph runs every expert on every row. Returns the model."""
    for module in model.modules():
        for base, mixin in MIXINS:
            if isinstance(module, base) and not isinstance(module, mixin):
                module.__class__ = _with_mixin(type(module), mixin)
        if isinstance(module, MoE):
            module.stacks.get(module.experts)
    return model


def static_step(model: nn.Module, tokens: torch.Tensor, cache, pos: torch.Tensor) -> torch.Tensor:
    """One decoding step with the same shapes at every step, for torch.compile and CUDA graphs (gpt-fast's recipe):
    tokens [B] at positions pos: [B] (a tensor, not an int: no recompilation per step) -> logits [B, V];
    attention spans the whole static cache, masked beyond pos."""
    return model(tokens[:, None], cache, pos, attend_length=cache.max_seq_len)[:, -1]


@functools.cache
def compiled_decode_step(device_type: str):
    """`static_step` through torch.compile, once per device type and process (a new batch size or cache length
    recompiles once, then both dims are dynamic). On a GPU: CUDA graphs (mode "reduce-overhead") and
    coordinate-descent tuning of the Triton kernels, which also turns one-row matmuls into fused multiply-and-sum
    kernels (as gpt-fast sets it): one-row matrix-vector products near the memory bandwidth, fused with the norms
    before them. On CPU: `cpu_decode_backend` (dsv3/fast/matvec.py), inductor with its C++ wrapper and the same
    multiply-and-sum for products of a few rows."""
    if device_type == "cuda":  # {"triton.cudagraphs": True} is what mode="reduce-overhead" sets
        return torch.compile(static_step, options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})
    return torch.compile(static_step, backend=cpu_decode_backend)


@functools.cache
def _compiled_dynamic(fn):
    return torch.compile(fn, dynamic=True)


def compiled_prefill(prefill):
    """prefill(model, input_ids [B, T], cache) through torch.compile with dynamic shapes: one graph for every
    prompt length (compiled at the first, ~40 s on the bundled model), in which inductor fuses the norms, RoPE and
    activations around the library matmuls (-22% for a 256-token prompt of the bundled model on CPU,
    docs/results.md). Sizes 1 are specialised, as always in torch.compile: a batch of one, or a one-token
    prompt, gets a graph of its own."""
    compiled = _compiled_dynamic(prefill)

    def run(model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor:
        prepare(model)  # eagerly, before the graph that reads the expert stacks
        # no duck sizing: it would give the prompt length the symbol of any equal size (a 256-token prompt and a
        # 256-wide stack of expert weights), whose specialisation then pins the prompt length too
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(model, input_ids, cache)
    return run


def mark_static_cache(cache, guard: bool = True) -> None:
    """For compiled steps on CUDA: CUDA graphs may keep a graph input's address, and the cache is updated in place
    at the same address every step, so its buffers are marked static. Unmarked, a graph that writes into them is
    not captured ("skipping cudagraphs due to mutated inputs"). guard=False: no guard on the tensors' identity, for
    several caches (the engine's row views, one per batch size) that share one compiled graph. The cache's index
    tensors (`layer_ids`, `row_ids`: constant) are marked too, so that a graph replay does not copy them in."""
    for buffer in (cache.kv, cache.pe, cache.ik, cache.layer_ids, cache.row_ids):
        if buffer is not None:
            torch._dynamo.mark_static_address(buffer, guard=guard)


def unguarded() -> AbstractContextManager:
    """Around a compiled step that passes the same model, cache and shapes as the step before (every decoding step
    after the first): dynamo's guards (~0.3 ms a step on the bundled model, ~9%) can only pass, so only those that
    pick between graphs are evaluated (torch >= 2.7; before, a no-op). Never hold it across a `yield`: the caller's
    own compiled code would run unguarded too."""
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None or "skip_guard_eval_unsafe" not in inspect.signature(stance).parameters:
        return nullcontext()
    return stance(skip_guard_eval_unsafe=True)
