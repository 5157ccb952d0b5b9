"""FP8 (e4m3) weights with DeepSeek-V3's 128×128 block scales — the format its checkpoints ship in.

State (names as in the hub checkpoints, docs/architecture.md §6): `weight` float8_e4m3fn [out, in]
and `weight_scale_inv` float32 [ceil(out/128), ceil(in/128)], with W[i, j] = fp8[i, j] · scale_inv[i//128, j//128]
(a multiply, despite the name). Quantizing: per 128×128 block (zero-padded at the edges) scale = amax / 448, the
e4m3 maximum. Bytes: 1 per weight + 4 per 16384 weights, ≈ 0.5 of bf16.

Kernel (CUDA sm90, in and out multiples of 128): activations are quantized online in 1×128 tiles (s = amax/448 per
token per 128 channels, DeepSeek's `act_quant`) and `torch.nn.functional.scaled_mm` runs the e4m3 GEMM with
BlockWise1x128 × BlockWise128x128 scaling (cuBLAS ≥ 12.9), accumulating in fp32 as DeepSeek's `fp8_gemm` does.
It differs from the reference by the activation rounding (~3% relative per element, e4m3 has 3 mantissa bits).
On a CPU (no float8 GEMM there) the "kernel" is a dequantise-and-matmul made cheap: `dequantize_fp8_rows` reads the
fp8 bytes by moving bits (torch's own float8 cast runs element by element: 1.1 ms for a 768x256 weight on AVX2, 20x
that weight's bf16 matvec), and the matmul runs in float32 on the float32 weight that makes (on AVX2 a bf16 matmul is
~10x slower than fp32's above a few rows, dsv3/quant/int8.py), the output cast back to the activations' dtype; a
large weight is read and multiplied in slabs of rows that stay in cache (`forward_slabs`, CPU_SLAB_ELEMENTS). It
differs from the reference only by the reference's rounding of the weight to bf16. Where no cheap read is possible
(NaN codes in the weight, scales that overflow; checked once, when placed) the reference path runs instead, as it
does elsewhere (DeepSeek's default `gemm_impl = "bf16"`).

Rows (M) the cuBLAS blockwise kernel accepts, measured on an H200 (torch 2.11, four weight shapes):
    M = 1       "scale_a must have strides (1, 1); got [1, 16]"   (a 1-row scale_a is not column-major)
    M = 2, 6    CUBLAS_STATUS_NOT_SUPPORTED (no algorithm from cublasLtMatmulAlgoGetHeuristic)
    M = 16, 32, 128   run
so `forward_kernel` pads the rows with zeros to a multiple of FP8_ROW_MULTIPLE (`padded_rows`) and slices the
result: decode (M = 1) reads the fp8 weight once, as the unpadded GEMM would, and the 15 zero rows cost tensor-core
time the memory-bound matvec does not miss. `quantize_activations` builds xq [M_pad, K] and scale_a [M_pad, K/128]
column-major (strides (1, M_pad)), the layout cuBLAS asks for at every M_pad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hub import FP8_BLOCK, dequantize_fp8, dequantize_fp8_rows, fp8_row_scales
from .base import CPU_SLAB_ELEMENTS, QuantizedLinear, linear_rows, slab_product

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8_ROW_MULTIPLE = 16  # activation rows per cuBLAS blockwise fp8 GEMM: a multiple of this (table above)


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] -> (float8_e4m3fn [out, in], scale_inv float32 [ceil(out/block), ceil(in/block)])."""
    out_dim, in_dim = w.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    padded = F.pad(w.float(), (0, cols * block - in_dim, 0, rows * block - out_dim))
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:out_dim, :in_dim]
    return q.to(torch.float8_e4m3fn), scale


def padded_rows(m: int) -> int:
    """Rows of the GEMM for m activation rows: the next multiple of FP8_ROW_MULTIPLE."""
    return -(-m // FP8_ROW_MULTIPLE) * FP8_ROW_MULTIPLE


def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's `act_quant` on zero-padded rows: x2d [M, K] (K % 128 == 0) -> (xq float8_e4m3fn [M_pad, K],
    scale_a float32 [M_pad, K/128] with strides (1, M_pad)), x ≈ xq · scale_a per 1x128 tile; M_pad = padded_rows(M).
    Zero rows get the floor scale 1e-4/448 and quantize to zeros."""
    m, k = x2d.shape
    m_pad, k_blocks = padded_rows(m), k // FP8_BLOCK
    tiles = x2d.new_zeros(m_pad, k, dtype=torch.float32)  # the float32 copy of x, with the padding rows
    tiles[:m] = x2d
    tiles = tiles.view(m_pad, k_blocks, FP8_BLOCK)
    s = tiles.abs().amax(dim=-1).clamp(min=1e-4) / FP8_MAX  # [M_pad, K/128], per token per 128 channels
    xq = (tiles / s[..., None]).to(torch.float8_e4m3fn).view(m_pad, k)
    scale_a = torch.empty_strided((m_pad, k_blocks), (1, m_pad), dtype=torch.float32, device=x2d.device)
    return xq, scale_a.copy_(s)


class FP8Linear(QuantizedLinear):
    scheme = "fp8"

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 bias: torch.Tensor | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale_inv", torch.ones(-(-out_features // FP8_BLOCK),
                                                            -(-in_features // FP8_BLOCK), device=device))
        # set by _prepare_kernel for the device placed on (plain attributes, rebuilt at every placement):
        self.scale_b = None  # CUDA: the GEMM's [K/128 padded to 4, out/128] column-major weight scales
        self.row_scales = None  # CPU: fp8_row_scales [out, K blocks] for dequantize_fp8_rows
        self.slab_rows = max(1, CPU_SLAB_ELEMENTS // in_features)  # CPU: weight rows read per slab

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **_) -> "FP8Linear":
        w = linear_rows(linear)
        layer = cls(linear.in_features, linear.out_features, w.dtype, linear.bias, w.device)
        layer.weight, layer.weight_scale_inv = quantize_fp8(w)
        layer._place()
        return layer

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale_inv, dtype)

    def kernel_supported(self, device: torch.device, dtype: torch.dtype) -> bool:
        if device.type == "cpu":
            return dtype in (torch.bfloat16, torch.float16, torch.float32)
        return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(F, "scaled_mm")
                and torch.cuda.get_device_capability(device) == (9, 0)
                and self.in_features % FP8_BLOCK == 0 and self.out_features % FP8_BLOCK == 0)

    def _prepare_kernel(self) -> None:
        self.scale_b = self.row_scales = None
        if self.weight.device.type != "cpu":
            self._prepare_scaled_mm()
            return
        self.row_scales = fp8_row_scales(self.weight, self.weight_scale_inv)
        self.kernel_ready = self.row_scales is not None  # else the bit read cannot carry them: the reference path

    def forward_kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.row_scales is not None:  # CPU: x2d [N, in] @ the float32 weight [out, in]ᵀ, cast back
            return self.forward_slabs(x2d.float()).to(x2d.dtype)
        return self.forward_scaled_mm(x2d)

    # CPU with AVX-512 and bf16 activations (stop 36), float32 kernel against the bf16 matmul on the bf16 weight (the
    # reference's product), us at 1 / 16 / 64 / 256 rows: 64x256 30|269, 34|53, 60|60, 131|93; 768x256 91|139,
    # 160|158, 370|254, 1135|610; 1408x2048 975|2390, 2460|2754, 7080|5757, 25993|14013. oneDNN's bf16 matmul
    # overtakes the float32 one at ~16-64 rows, later for small layers (as int4's dense path: DENSE_FIXED_WEIGHTS).
    DENSE_ABOVE_ROWS = {"cpu/avx512/bfloat16": 32}
    DENSE_FIXED_WEIGHTS = {"cpu/avx512/bfloat16": 1 << 15}

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """CPU, many rows: x [..., in] @ the weight dequantised to x's dtype (the reference's weight, the same bits),
        in slabs."""
        if self.row_scales is None:
            return super().forward_dense(x)
        y = self.forward_slabs(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward_slabs(self, x: torch.Tensor) -> torch.Tensor:
        """CPU: x [N, in] -> [N, out] in x's dtype, the weight read into that dtype `slab_rows` rows at a time (one
        slab for a small layer; CPU_SLAB_ELEMENTS)."""
        w, scales = self._buffers["weight"], self.row_scales
        return slab_product(x, self.out_features, self.slab_rows,
                            lambda start, stop: dequantize_fp8_rows(w[start:stop], scales[start:stop], x.dtype))

    def _prepare_scaled_mm(self) -> None:
        k_blocks = self.in_features // FP8_BLOCK
        padded = -(-k_blocks // 4) * 4  # cuBLAS wants the 128x128 scale rows padded to a multiple of 4
        self.scale_b = F.pad(self.weight_scale_inv, (0, padded - k_blocks)).t()  # [padded, out/128], column-major

    def forward_scaled_mm(self, x2d: torch.Tensor) -> torch.Tensor:
        """CUDA sm90: x2d [M, K] bf16 -> [M, out] through cuBLAS's blockwise-scaled e4m3 GEMM (module docstring)."""
        xq, scale_a = quantize_activations(x2d)
        y = F.scaled_mm(xq, self.weight.t(), scale_a, F.ScalingType.BlockWise1x128, self.scale_b,
                        F.ScalingType.BlockWise128x128, output_dtype=x2d.dtype)  # [M_pad, out]
        return y[:x2d.shape[0]]
