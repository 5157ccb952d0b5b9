"""Helpers shared by tests/test_quant.py (CPU) and tests/test_quant_gpu.py: errors, layers, the e4m3 bound."""

import torch
from torch import nn

from dsv3.quant.fp8 import FP8_BLOCK


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear(out_dim: int, in_dim: int, dtype=torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.normal_(layer.weight, std=0.02)
    return layer.to(dtype)


def e4m3_bound(x: torch.Tensor, scale_a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|y - x @ wᵀ| bound [M, N] for y = x̂ @ wᵀ where x̂ is x [M, K] rounded to e4m3 in 1x128 tiles of scale
    scale_a [>= M, K/128]: per element half an ulp — 2^-4 relative for normals (3 mantissa bits), 2^-10 · s below
    them (subnormal step 2^-9) — weighted by |w|, plus an ulp of bf16 (2^-8 relative) for the output's rounding
    and float32 accumulation slack."""
    m = x.shape[0]
    per_elem = 2.0 ** -4 * x.abs() + 2.0 ** -10 * scale_a[:m].repeat_interleave(FP8_BLOCK, dim=1)
    return per_elem @ w.abs().t() * (1 + 1e-4) + 2.0 ** -8 * (x @ w.t()).abs() + 1e-6
