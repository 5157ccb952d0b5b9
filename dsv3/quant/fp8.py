"""FP8 (e4m3) weights with DeepSeek-V3's 128×128 block scales — the format its checkpoints ship in.

State (names as in the hub checkpoints, ../shared/reference/architecture.md §6): `weight` float8_e4m3fn [out, in]
and `weight_scale_inv` float32 [ceil(out/128), ceil(in/128)], with W[i, j] = fp8[i, j] · scale_inv[i//128, j//128]
(a multiply, despite the name). Quantizing: per 128×128 block (zero-padded at the edges) scale = amax / 448, the
e4m3 maximum. Bytes: 1 per weight + 4 per 16384 weights, ≈ 0.5 of bf16.

Kernel (CUDA sm90, in and out multiples of 128): activations are quantized online in 1×128 tiles (s = amax/448 per
token per 128 channels, DeepSeek's `act_quant`) and `torch.nn.functional.scaled_mm` runs the e4m3 GEMM with
BlockWise1x128 × BlockWise128x128 scaling (cuBLAS ≥ 12.9), accumulating in fp32 as DeepSeek's `fp8_gemm` does.
It differs from the reference by the activation rounding (~3% relative per element, e4m3 has 3 mantissa bits).
Elsewhere the reference path dequantises (DeepSeek's default `gemm_impl = "bf16"`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint import FP8_BLOCK, dequantize_fp8
from .base import QuantizedLinear

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] -> (float8_e4m3fn [out, in], scale_inv float32 [ceil(out/block), ceil(in/block)])."""
    out_dim, in_dim = w.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    padded = F.pad(w.float(), (0, cols * block - in_dim, 0, rows * block - out_dim))
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:out_dim, :in_dim]
    return q.to(torch.float8_e4m3fn), scale


class FP8Linear(QuantizedLinear):
    scheme = "fp8"

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 bias: torch.Tensor | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale_inv", torch.ones(-(-out_features // FP8_BLOCK),
                                                            -(-in_features // FP8_BLOCK), device=device))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **_) -> "FP8Linear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, w.dtype, linear.bias, w.device)
        layer.weight, layer.weight_scale_inv = quantize_fp8(w)
        return layer

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale_inv, dtype)

    def kernel_available(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cuda" and x.dtype == torch.bfloat16 and hasattr(F, "scaled_mm")
                and torch.cuda.get_device_capability(x.device) == (9, 0)
                and self.in_features % FP8_BLOCK == 0 and self.out_features % FP8_BLOCK == 0)

    def forward_kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        m, k = x2d.shape
        tiles = x2d.float().view(m, k // FP8_BLOCK, FP8_BLOCK)
        s = tiles.abs().amax(dim=-1).clamp(min=1e-4) / FP8_MAX  # [M, K/128], per token per 128 channels
        xq = (tiles / s[..., None]).to(torch.float8_e4m3fn).view(m, k)
        k_blocks = k // FP8_BLOCK
        padded = -(-k_blocks // 4) * 4  # cuBLAS wants the 128x128 scale rows padded to a multiple of 4
        scale_b = F.pad(self.weight_scale_inv, (0, padded - k_blocks)).t()  # [padded, out/128], column-major
        scale_a = s.t().contiguous().t()  # [M, K/128], column-major
        return F.scaled_mm(xq, self.weight.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b,
                           F.ScalingType.BlockWise128x128, output_dtype=x2d.dtype)
