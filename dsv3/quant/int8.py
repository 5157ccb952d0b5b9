"""INT8 weight-only, symmetric, one scale per output channel (torchao `Int8WeightOnlyConfig`, PerRow granularity).

    scale[n] = max_k |W[n, k]| / 127,   q[n, k] = clamp(round(W[n, k] / scale[n]), -127, 127)   (int8)
    W ≈ q · scale[:, None]

Range [-127, 127] (not -128) keeps the grid symmetric, as `aten._weight_int8pack_mm` expects
(../shared/reference/eval-lora-quant.md §4.2). State: `weight` int8 [out, in], `weight_scale` [out] in the model's
float dtype (bf16 or fp32). Bytes: 1 per weight + 2-4 per row, so ≈ 0.5 of bf16.
Kernel: on CPU `aten._weight_int8pack_mm(x, q, scale)` (int8 weights read directly, scale applied per output);
on CUDA the scale is applied after an int8→activation-dtype cast matmul, `(x @ qᵀ) · scale`, the form
torch.compile fuses into one kernel (gpt-fast's int8 path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import QuantizedLinear

INT8_MAX = 127


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] float -> (q int8 [out, in], scale float32 [out])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).eps) / INT8_MAX
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8Linear(QuantizedLinear):
    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 bias: torch.Tensor | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **_) -> "Int8Linear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, w.dtype, linear.bias, w.device)
        layer.weight, scale = quantize_int8(w)
        layer.weight_scale = scale.to(w.dtype)
        return layer

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)

    def kernel_available(self, x: torch.Tensor) -> bool:
        return x.device.type in ("cpu", "cuda") and x.is_floating_point()

    def forward_kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.device.type == "cpu":
            return torch._weight_int8pack_mm(x2d, self.weight, self.weight_scale.to(x2d.dtype))
        return F.linear(x2d, self.weight.to(x2d.dtype)) * self.weight_scale.to(x2d.dtype)
