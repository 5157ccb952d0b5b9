"""Multi-head Latent Attention (MLA), paper-V3 §2.1.1 eqs. (1)-(11), in its two equivalent forms.

Shapes: B batch, T new tokens, S attended tokens (cache length), H heads, D hidden,
d_n = qk_nope_head_dim, d_r = qk_rope_head_dim, d_v = v_head_dim, d_c = kv_lora_rank.

- naive ("MHA mode"): expand the cached latent through kv_b_proj into per-head keys and values, then ordinary
  attention. Cheapest when many queries share the keys (training, prefill).
- absorbed ("MQA mode"): fold W_UK into the query and W_UV into the output (paper-V2 §2.1.2), so scores are taken
  directly against the d_c-dim latent shared by all heads. Cheapest for decoding: nothing per-head is materialised
  for the S cached tokens. DeepSeek's inference/model.py carries both (attn_impl "naive" / "absorb").
The cache holds only kv_a_layernorm(c_kv) and the roped shared key k_pe, whichever form runs.

Every layer of one forward shares an `Attend` context (positions, mask, RoPE tables, cache, attention span, the
form, the rows to keep); DeepSeek Sparse Attention (dsv3/dsa.py) is `SparseMLA`, a subclass of this MLA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .layers import RMSNorm, linear_weight
from .rope import apply_rope

AttnImpl = Literal["auto", "naive", "absorb"]


@dataclass(frozen=True)
class Attend:
    """What every attention layer of one forward shares.

    positions: [B, T] the new tokens' positions; mask: [B, T, S] bool (True = may attend); cos/sin: [B, T, d_r/2]
    RoPE tables at `positions`; cache: the latent cache (None: S = T, the keys are the new tokens themselves);
    length: S, how many cache slots attention spans; attn_impl: "naive", "absorb" or "auto" (absorbed for a single
    query); keep > 0: only the last `keep` positions are queried (a last layer whose other rows no logit needs).
    """
    positions: torch.Tensor
    mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache: KVCache | None = None
    length: int | None = None
    attn_impl: AttnImpl = "auto"
    keep: int = 0

    @property
    def causal(self) -> bool:
        """The keys are the T new tokens, each one queried, so the mask is plain causal (SDPA's fused kernels can
        skip the blocks above the diagonal): no cache, or a cache filled from position 0 (length == T)."""
        return (self.cache is None or self.length == self.positions.shape[1]) and not self.keep


class MLA(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.d_nope, self.d_rope, self.d_v = (c.num_attention_heads, c.qk_nope_head_dim,
                                                             c.qk_rope_head_dim, c.v_head_dim)
        self.kv_lora_rank = c.kv_lora_rank
        self.interleave = c.rope_interleave
        self.softmax_scale = c.softmax_scale
        q_out = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:  # low-rank query compression: c_q = W_DQ h, q = W_UQ norm(c_q)
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        # one projection gives the latent c_kv (d_c) and the single shared rope key k_pe (d_r): "with MQA"
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        # The latent norms keep RMSNorm's default eps 1e-6 whatever rms_norm_eps says: DeepSeek's model.py and
        # transformers both build them without it (it matters for Moonlight, whose rms_norm_eps is 1e-5).
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def query(self, x: torch.Tensor, q_latent: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> q: [B, T, H, d_n + d_r] (nope first, rope last, as the checkpoints lay it out).
        q_latent: c_q = q_a_layernorm(q_a_proj(x)) when the caller has it already (q-LoRA models)."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)) if q_latent is None else q_latent)
        return q.view(*x.shape[:2], self.n_heads, self.d_nope + self.d_rope)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the rope slice x: [B, T, (H,) d_r] by cos/sin: [B, T, d_r/2] (dsv3/rope.py)."""
        return apply_rope(x, cos, sin, self.interleave)

    def latent(self, x: torch.Tensor, ctx: Attend, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, D] -> the normed latent c_kv [B, S, d_c] and the roped shared key k_pe [B, S, d_r] attention
        runs over, in x's dtype: the T new tokens (no cache), or the first S cache slots after writing them."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split_with_sizes([self.kv_lora_rank, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, T, d_c]
        k_pe = self.rotate(k_pe, ctx.cos, ctx.sin)  # [B, T, d_r]
        if ctx.cache is not None:
            c_kv, k_pe = ctx.cache.update(layer, ctx.positions, c_kv, k_pe, ctx.length)
        return c_kv.to(x.dtype), k_pe.to(x.dtype)

    def forward(self, x: torch.Tensor, ctx: Attend, layer: int = 0) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D], or [B, keep, D] with ctx.keep > 0 (keys, values and the cache still cover
        all T). `layer` indexes the cache. attn_impl "auto": absorbed for a single query, naive otherwise."""
        x_q, cos, sin, mask = x, ctx.cos, ctx.sin, ctx.mask
        if ctx.keep:  # the query side: the last `keep` positions
            x_q, cos, sin, mask = x[:, -ctx.keep:], cos[:, -ctx.keep:], sin[:, -ctx.keep:], mask[:, -ctx.keep:]
        q_nope, q_pe = self.query(x_q).split_with_sizes([self.d_nope, self.d_rope], dim=-1)
        q_pe = self.rotate(q_pe, cos, sin)
        c_kv, k_pe = self.latent(x, ctx, layer)
        return self.o_proj(self.attend(q_nope, q_pe, c_kv, k_pe, mask, ctx).flatten(2))

    def attend(self, q_nope, q_pe, c_kv, k_pe, mask, ctx: Attend) -> torch.Tensor:
        """Dense attention of the queries q_nope [B, T, H, d_n], q_pe [B, T, H, d_r] over c_kv [B, S, d_c], k_pe
        [B, S, d_r] under mask [B, T, S], in the form ctx.attn_impl picks: [B, T, H, d_v]."""
        attn_impl = ctx.attn_impl
        if attn_impl == "auto":
            attn_impl = "absorb" if q_nope.shape[1] == 1 else "naive"
        if attn_impl == "absorb":
            return self._absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        return self._naive(q_nope, q_pe, c_kv, k_pe, None if ctx.causal else mask)

    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MHA mode's per-head keys and values: k = [W_UK c ; k_pe] [B, S, H, d_n+d_r], v = W_UV c [B, S, H, d_v]."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.d_nope + self.d_v)
        k_nope, v = kv.split_with_sizes([self.d_nope, self.d_v], dim=-1)
        return torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)), dim=-1), v

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, d_n, d_c] and W_UV [H, d_v, d_c], the two halves of kv_b_proj per head (paper-V2 §2.1.2)."""
        w = linear_weight(self.kv_b_proj).to(dtype).view(self.n_heads, self.d_nope + self.d_v, self.kv_lora_rank)
        return w.split_with_sizes([self.d_nope, self.d_v], dim=1)

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None) -> torch.Tensor:
        """Expand keys/values per head, then softmax(q·k·scale) v: [B, T, H, d_v].

        mask None: causal with S == T (is_causal lets the fused kernels skip the blocks above the diagonal)."""
        k, v = self.expand_kv(c_kv, k_pe)
        q = torch.cat((q_nope, q_pe), dim=-1)  # [B, T, H, d_n+d_r]
        d_qk = q.shape[-1]
        if padded := v.device.type == "cpu" and self.d_v < d_qk:
            # PyTorch's CPU flash kernel needs one head dim for q, k and v, else SDPA falls back to the unfused
            # math path (~3x slower at T=256 here): pad v with zeros, drop the padded output columns below.
            v = F.pad(v, (0, d_qk - self.d_v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=None if mask is None else mask[:, None],
                                             is_causal=mask is None, scale=self.softmax_scale)
        out = out.transpose(1, 2)  # [B, T, H, d_v (padded on CPU)]
        return out[..., :self.d_v] if padded else out

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Scores against the latent: (W_UKᵀ q_nope)·c + q_pe·k_pe; output W_UV (Σ p c): [B, T, H, d_v].

        Every head attends to the same latent c_kv and rope key k_pe (MQA), so a sequence's T·H (token, head)
        queries stack into one [T·H, d_c] matrix, and scores and output are one batched matmul over B each (FlashMLA
        lays the heads out as query rows the same way); the per-head absorptions are batched over H. Plain matmuls
        rather than einsums: an einsum pays for parsing and permuting on every call, ~5% of an eager CPU decode step
        on the bundled model (docs/results.md)."""
        B, T, H, _ = q_nope.shape
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)  # [H, d_n, d_c], [H, d_v, d_c]
        q_lat = (q_nope.flatten(0, 1).transpose(0, 1) @ w_uk).transpose(0, 1)  # [H, B·T, d_n] @ W_UK -> [B·T, H, d_c]
        q_lat, q_pe = q_lat.reshape(B, T * H, -1), q_pe.reshape(B, T * H, -1)  # [B, T·H, d_c], [B, T·H, d_r]
        scores = (q_lat @ c_kv.mT + q_pe @ k_pe.mT) * self.softmax_scale  # [B, T·H, S]
        scores = scores.view(B, T, H, -1).masked_fill(~mask[:, :, None], float("-inf"))  # mask: [B, T, 1, S]
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)  # softmax in fp32 (official)
        o_lat = probs.view(B, T * H, -1) @ c_kv  # Σ_s p_s c_s: [B, T·H, d_c]
        out = o_lat.view(B * T, H, -1).transpose(0, 1) @ w_uv.mT  # [H, B·T, d_c] @ W_UVᵀ
        return out.transpose(0, 1).reshape(B, T, H, -1)  # [H, B·T, d_v] -> [B, T, H, d_v]
