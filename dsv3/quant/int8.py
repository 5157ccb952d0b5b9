"""INT8 weight-only, symmetric, one scale per output channel (torchao `Int8WeightOnlyConfig`, PerRow granularity).

    scale[n] = max_k |W[n, k]| / 127,   q[n, k] = clamp(round(W[n, k] / scale[n]), -127, 127)   (int8)
    W ≈ q · scale[:, None]

Range [-127, 127] (not -128) keeps the grid symmetric, as `aten._weight_int8pack_mm` expects
(docs/eval-lora-quant.md §4.2). State: `weight` int8 [out, in], `weight_scale` [out] in the model's
float dtype (bf16 or fp32). Bytes: 1 per weight + 2-4 per row, so ≈ 0.5 of bf16.
Kernel, by device and rows M:
    CPU                         `aten._weight_int8pack_mm(x, q, scale)`: int8 weights read directly, scale per output
    CUDA                        `(x @ qᵀ) · scale` after an int8→bf16 cast: inside a compiled graph inductor fuses
                                the cast into the matmul (gpt-fast's int8 path); eager it is a cast + a dense GEMM
                                (CUDA's _weight_int8pack_mm was slower on an H200: 66.8 against 41.6 us)
Many rows (`forward_dense`): the same `(x @ qᵀ) · scale` — the cast of q is exact (|q| <= 127 fits bf16's 8 bits),
so the dense matmul reads one converted copy of the weight and the scale is one multiply of the output.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .base import QuantizedLinear, linear_rows

INT8_MAX = 127
# torch 2.13's AVX-512 `_weight_int8pack_mm`, from 4 rows up, reads its operands with aligned vector loads: an input
# not 32-byte aligned or a weight not 16-byte aligned ends the process with SIGSEGV (AMD EPYC, AVX-512; offsets of
# 8, 16 and 48 bytes crashed, 32 and 64 ran). A weight read from a safetensors file sits wherever its offset in the
# file puts it, and an input may be a view into a larger tensor, so both are brought to this alignment (that of
# torch's CPU allocator) when they are not.
CPU_ALIGN = 64


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] float -> (q int8 [out, in], scale float32 [out])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).eps) / INT8_MAX
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8Linear(QuantizedLinear):
    scheme = "int8"
    # CPU, bf16, one thread (2-core Xeon, AVX-512, torch 2.13): the kernel costs ~6 us per row on a 768x256 matrix
    # and ~0.5 us per row on the bundled model's 64x256 experts, against ~30 us + 0.3 us per row for cast + dense
    # matmul; whole-model 256-token prefill was fastest with the switch at 64 rows (1.20x bf16; 8 rows: 1.25x).
    # AVX2 (2-core AMD EPYC, torch 2.13, 768x256, 1 / 16 / 128 rows, us): bf16 kernel 38 / 190 / 1336 against dense
    # 159 / 882 / 8042 (a bf16 matmul without AVX-512 runs ~10x slower than fp32): the kernel at every row count;
    # fp32 kernel 245 / 3594 / 43091 against dense 69 / 233 / 806: the dense path at every row count.
    DENSE_ABOVE_ROWS = {"cpu": 64, "cpu/avx2/bfloat16": sys.maxsize, "cpu/avx2/float32": 0, "cuda": 16}

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 bias: torch.Tensor | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **_) -> "Int8Linear":
        w = linear_rows(linear)
        layer = cls(linear.in_features, linear.out_features, w.dtype, linear.bias, w.device)
        layer.weight, scale = quantize_int8(w)
        layer.weight_scale = scale.to(w.dtype)
        layer._place()
        return layer

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)

    def kernel_supported(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type in ("cpu", "cuda") and dtype.is_floating_point

    def _prepare_kernel(self) -> None:
        self.scale = self.weight_scale.to(self.dtype)  # [out] in the compute dtype (the same tensor when it is)
        if self.weight.is_cpu and self.weight.data_ptr() % CPU_ALIGN:  # (CPU_ALIGN) a copy, once, when placed
            self.weight = self.weight.clone(memory_format=torch.contiguous_format)

    def forward_kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.is_cpu:
            if not torch.compiler.is_compiling() and x2d.data_ptr() % CPU_ALIGN:  # (CPU_ALIGN; a compiled graph
                # cannot trace data_ptr, and inductor's own buffers are aligned)
                x2d = x2d.clone(memory_format=torch.contiguous_format)
            return torch._weight_int8pack_mm(x2d, self._buffers["weight"], self.scale)  # (int4.py: `_buffers`)
        return self._cast_matmul(x2d)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        y = self._cast_matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _cast_matmul(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> (x @ qᵀ) · scale [..., out]
        return F.linear(x, self.weight.to(x.dtype)) * self.scale
