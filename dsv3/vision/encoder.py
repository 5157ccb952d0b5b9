"""The vision tower: a ViT laid out as SigLIP (the encoder of DeepSeek-VL2, arXiv:2412.10302 §2), so with no
convolutional stem its state dict loads unchanged into transformers' `SiglipVisionModel` (5.x) (tests/test_vision.py
checks the parity).

pixels [B, C, H, W] -> [conv stem] -> patch embedding (total stride P) [B, N, Dv] + learned positions -> pre-norm
blocks (x += attn(LN(x)); x += MLP(LN(x))) -> post LayerNorm [B, N, Dv], N = (H/P)(W/P).

The optional stem is the hybrid ViT of Dosovitskiy et al. (arXiv:2010.11929 §3.1, "Hybrid Architecture"): a few
stride-2 3x3 convolutions before the patch projection, which Xiao et al. (arXiv:2106.14881) found make ViTs train
faster and less fragile. VL2 needs none, its SigLIP is pre-trained; a ViT trained from scratch on our small
synthetic set read no printed word without it (docs/vision.md §3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class VisionEmbeddings(nn.Module):
    """Patches and learned absolute positions (SigLIP; VL2 interpolates them for other sizes, we keep one size)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        stem, channels = [], config.num_channels
        for width in config.conv_stem:  # each: [B, c, H, W] -> [B, width, H/2, W/2]
            stem += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GELU()]
            channels = width
        self.stem = nn.Sequential(*stem)
        rest = config.patch_size // 2 ** len(config.conv_stem)  # the stride left for the patch projection
        self.patch_embedding = nn.Conv2d(channels, config.hidden_size, rest, stride=rest)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, N, Dv]
        x = self.stem(pixels.to(self.patch_embedding.weight.dtype))
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    """Multi-head self-attention over all patches (no mask: every patch sees every other)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        """x: [B, N, Dv] -> ([B, N, Dv], attention probabilities [B, H, N, N] or None)."""
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if need_weights:  # the explicit softmax, for attention maps (notebooks/08_multimodal.ipynb)
            probs = torch.softmax(q @ k.transpose(-1, -2) * (D // self.heads) ** -0.5, dim=-1)
            out = probs @ v
        else:
            probs, out = None, F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D)), probs


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # SigLIP's gelu_pytorch_tanh
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        a, probs = self.self_attn(self.layer_norm1(x), need_weights)
        x = x + a
        return x + self.mlp(self.layer_norm2(x)), probs


class VisionBlocks(nn.Module):
    """Holds the blocks under `encoder.layers`, SigLIP's key names."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionBlocks(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, C, H, W] normalised to [-1, 1] -> patch features [B, N, Dv]."""
        return self.forward_with_attention(pixels, need_weights=False)[0]

    def forward_with_attention(self, pixels: torch.Tensor, need_weights: bool = True):
        """-> (features [B, N, Dv], per layer the attention probabilities [B, H, N, N] when need_weights)."""
        x = self.embeddings(pixels)
        maps = []
        for block in self.encoder.layers:
            x, probs = block(x, need_weights)
            maps.append(probs)
        return self.post_layernorm(x), maps if need_weights else []
