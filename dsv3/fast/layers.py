"""Compiled-graph forms of the small building blocks: the SwiGLU hidden stored once, RoPE in real arithmetic,
RMSNorm through `F.rms_norm`, int8 layers of a few rows as a cast and a matmul, fp8 weights read by torch's cast.

Mixins that `dsv3.fast.prepare` adds to the model's MLP, MLA, RMSNorm, Int8Linear and FP8Linear classes. Eager, each
override is its base method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import rms_norm_reference
from ..rope import apply_rope_reference
from .matvec import few_rows


def stored(x: torch.Tensor) -> torch.Tensor:
    """x itself; inside a torch.compile graph, also a hint that inductor should write x to memory once.

    On a GPU, a compiled decode step's one-row matmuls become inductor reductions (coordinate-descent tuning turns
    them into multiply-and-sum), and inductor inlines a small pointwise input into the reduction that reads it: the
    down projection then recomputes the SwiGLU hidden silu(gate)·up for each of its weight elements. For the routed
    experts of a V2-Lite-shaped layer at batch 1 that is 17M sigmoids for 12k outputs, and that kernel ran at
    1.6 TB/s on an H200 where the gate/up one before it reached 3.7 (docs/results.md). Fixing x's layout makes
    inductor store it instead. Eager, and where inductor stores x anyway (a library matmul's input; its CPU rules
    store a reused exp), it changes nothing. Only for tensors without gradients (inference): the op has no
    autograd formula, and a compiled training step keeps its intermediates for the backward anyway."""
    if torch.compiler.is_compiling() and not x.requires_grad:
        return torch.ops.prims.inductor_force_stride_order(x, x.stride())
    return x


class StoredHidden:
    """For `dsv3.layers.MLP`: the SwiGLU hidden is `stored` before the down projection reads it."""

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return stored(super().hidden(x))


class RealRope:
    """For `dsv3.attention.MLA` (and SparseMLA): compiled graphs rotate in real arithmetic
    (`apply_rope_reference`), which inductor fuses with the ops around it; eager keeps the complex multiply."""

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return apply_rope_reference(x, cos, sin, self.interleave)
        return super().rotate(x, cos, sin)


class FusedRMSNorm:
    """For `dsv3.layers.RMSNorm`: compiled graphs normalise through `rms_norm_reference` (`F.rms_norm`), which
    inductor fuses into one kernel. The eager form's few-op arithmetic saves nothing there, and its eps, a CPU scalar
    tensor, would be a CPU input of the graph, for which inductor does not capture CUDA graphs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return rms_norm_reference(x, self.weight, self.eps)
        return super().forward(x)


class FewRowInt8:
    """For `dsv3.quant.int8.Int8Linear`: in a compiled CPU graph, x2d [M, in] with `few_rows(M)` takes the layer's
    cast-and-matmul form, (x @ qᵀ) · scale, whose product dsv3/fast/matvec.py makes a reduction: one loop that reads
    the int8 weight itself, the cast fused (gpt-fast's int8 path). The library kernel, `_weight_int8pack_mm`, is
    opaque to inductor: the bundled model's compiled int8 decode step took 4.5-5.1 ms a token with it, 3.2-3.6 without
    (docs/results.md, stop 35). Same values: the cast of q is exact, and both multiply by the same scale. A dynamic
    row count keeps the kernel: there the product stays a library call, fed a converted copy of the weight."""

    def forward_kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x2d.is_cpu and few_rows(x2d.shape[0]):
            return self._cast_matmul(x2d)
        return super().forward_kernel(x2d)


class CastFP8:
    """For `dsv3.quant.fp8.FP8Linear`: in a compiled CPU graph, x @ Wᵀ on the weight as the reference dequantises it
    (`dsv3.hub.dequantize_fp8` in a graph: torch's float8 cast times the block scales), which inductor fuses into the
    few-row reduction. The eager bit read (`dequantize_fp8_rows`) goes through a float16 view, and inductor leaves a
    node that mixes float16 and bf16 unvectorised: one 1-row layer, 768x256 (8192x256), took 245-377 µs (2200-2280)
    that way against 75-77 (633-800) and bf16's 44-63 (228-234) (AVX-512 EPYC, stop 37). Same values: both are the
    reference's products, slab by slab or whole."""

    def forward_slabs(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # forward_slabs runs on a CPU only (FP8Linear.row_scales)
            return F.linear(x, self.dequantize(x.dtype))
        return super().forward_slabs(x)
