"""The vision-language adaptor of DeepSeek-VL2 (arXiv:2412.10302 §2, "Vision-Language Adaptor"): a 2x2 pixel shuffle
that folds each 2x2 block of patch features into one token (4x fewer tokens), a two-layer GELU MLP into the LM's
width, and a `<tile_newline>` embedding after each row of tokens.

One addition to VL2: an output RMSNorm whose weight starts at the RMS of the LM's token embeddings. Without it the
projected tokens came out ~60x larger than the text embeddings around them and swamped the LM (the first attempt
at this issue, docs/vision.md §3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RMSNorm
from .config import VisionConfig


def pixel_shuffle(x: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """x: [B, grid*grid, C] (row-major patches) -> [B, grid/f, grid/f, f*f*C]: each f x f block of neighbours
    concatenated along channels (rows of the block first, then columns)."""
    B, _, C = x.shape
    s = grid // factor
    x = x.view(B, s, factor, s, factor, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, s, s, factor * factor * C)


class Projector(nn.Module):
    def __init__(self, config: VisionConfig, lm_hidden: int, embed_rms: float = 1.0, eps: float = 1e-6) -> None:
        """embed_rms: the RMS of the LM's token embeddings, the output norm's starting scale."""
        super().__init__()
        self.config = config
        width = config.hidden_size * config.downsample ** 2
        self.fc1 = nn.Linear(width, lm_hidden)
        self.fc2 = nn.Linear(lm_hidden, lm_hidden)
        self.norm = RMSNorm(lm_hidden, eps)
        with torch.no_grad():
            self.norm.weight.fill_(embed_rms)
        self.image_newline = nn.Parameter(torch.randn(lm_hidden) * embed_rms) if config.image_newline else None

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The two-layer GELU MLP: [..., 4 Dv] -> [..., D] (transformers' DeepseekVLAligner computes the same)."""
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [B, N, Dv] (encoder output) -> image embeddings [B, tokens_per_image, D]."""
        c = self.config
        x = pixel_shuffle(features, c.grid, c.downsample)            # [B, s, s, 4 Dv]
        x = self.norm(self.mlp(x))                                   # [B, s, s, D]
        if self.image_newline is not None:
            B, s, _, D = x.shape
            x = torch.cat((x, self.image_newline.to(x.dtype).expand(B, s, 1, D)), dim=2)  # [B, s, s+1, D]
        return x.flatten(1, 2)
