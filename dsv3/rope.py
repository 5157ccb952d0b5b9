"""Rotary position embedding with YaRN context extension, on the decoupled rope slice of MLA.

Facts: docs/architecture.md §4. The frequencies follow transformers' `_compute_yarn_parameters`
(identical to DeepSeek's `precompute_freqs_cis`): dims rotating faster than `beta_fast` times over the original
context keep their frequency, those slower than `beta_slow` are divided by `factor`, a linear ramp in between.
cos/sin are scaled by `attention_factor` (1.0 for V3 and V2-Lite, whose mscale == mscale_all_dim); the mscale²
temperature goes into the softmax scale instead (`ModelConfig.softmax_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, yarn_get_mscale


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] of the rope slice (d = qk_rope_head_dim) and the cos/sin scale."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor = rs["factor"]
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    orig = rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:  # the dim index that rotates `rotations` times over `orig`
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions on the fly (no max-length table, so any position works)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = config.rope_interleave

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] int -> cos, sin: [B, T, d/2] float32."""
        angles = positions[..., None].float() * self.inv_freq.float()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x: [B, T, (H,) d] by cos/sin: [B, T, d/2], in float32, keeping x's layout and dtype.

    interleave=True: pairs are (x[2i], x[2i+1]) as DeepSeek's checkpoints store them (official `apply_rotary_emb`);
    False: pairs are (x[i], x[i + d/2]) (Llama's rotate_half). Both rotate pair i by angle position·inv_freq[i].
    Eager interleaved rotation is one complex multiply, as the official code does it (4x faster than the ~10 small
    ops of `apply_rope_reference` at T=256, and fewer ops per decode step). Compiled graphs fuse the real form
    into the ops around it instead (dsv3/fast/modules.py).
    """
    if not interleave:
        return apply_rope_reference(x, cos, sin, interleave)
    rot = torch.complex(cos, sin)  # e^{i·angle}: [B, T, d/2]
    if x.dim() == 4:
        rot = rot[:, :, None]
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # x[2i] + i·x[2i+1]
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """`apply_rope` written out in real arithmetic (the reference its complex form is tested against)."""
    if x.dim() == 4:  # [B, T, H, d]: broadcast over heads
        cos, sin = cos[:, :, None], sin[:, :, None]
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
