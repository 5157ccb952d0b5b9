"""Multi-head Latent Attention (MLA), paper-V3 §2.1.1 eqs. (1)-(11), in its two equivalent forms.

Shapes: B batch, T new tokens, S attended tokens (cache length), H heads, D hidden,
d_n = qk_nope_head_dim, d_r = qk_rope_head_dim, d_v = v_head_dim, d_c = kv_lora_rank.

- naive ("MHA mode"): expand the cached latent through kv_b_proj into per-head keys and values, then ordinary
  attention. Cheapest when many queries share the keys (training, prefill).
- absorbed ("MQA mode"): fold W_UK into the query and W_UV into the output (paper-V2 §2.1.2), so scores are taken
  directly against the d_c-dim latent shared by all heads. Cheapest for decoding: nothing per-head is materialised
  for the S cached tokens. DeepSeek's inference/model.py carries both (attn_impl "naive" / "absorb").
The cache holds only kv_a_layernorm(c_kv) and the roped shared key k_pe, whichever form runs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import dsa
from .cache import KVCache
from .config import ModelConfig
from .layers import RMSNorm, linear_weight
from .rope import apply_rope

AttnImpl = Literal["auto", "naive", "absorb"]


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
        # DeepSeek Sparse Attention (V3.2): a lightning indexer picks the entries each query attends to (dsv3/dsa.py)
        self.indexer = dsa.Indexer(c) if c.uses_dsa else None
        self.dsa_mode: dsa.DSAMode = "sparse"

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> q: [B, T, H, d_n + d_r] (nope first, rope last, as the checkpoints lay it out)."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(*x.shape[:2], self.n_heads, self.d_nope + self.d_rope)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                positions: torch.Tensor, cache: KVCache | None = None, layer: int = 0, length: int | None = None,
                impl: AttnImpl = "auto", keep: int = 0) -> torch.Tensor:
        """x: [B, T, D]; cos/sin: [B, T, d_r/2]; mask: [B, T, S] bool (True = may attend); positions: [B, T].
        Returns [B, T, D], or [B, keep, D] with keep > 0.

        With a cache, the new latents are written at `positions` and attention runs over its first `length` slots
        (S = length); without one, S = T. keep > 0 queries only the last `keep` positions (a last layer whose other
        outputs no logit needs); keys, values and the cache still cover all T. impl "auto": absorbed for a single
        query (decoding, or keep = 1), naive otherwise.
        """
        if keep and self.indexer is not None:  # the indexer scores every query: attend for all, keep the last rows
            return self.forward(x, cos, sin, mask, positions, cache, layer, length, impl)[:, -keep:]
        if keep:  # the query side: the last `keep` positions
            x_q, cos_q, sin_q, mask = x[:, -keep:], cos[:, -keep:], sin[:, -keep:], mask[:, -keep:]
        else:
            x_q, cos_q, sin_q = x, cos, sin
        if self.indexer is None:
            q = self.query(x_q)
        else:  # the indexer reads the query latent too
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent).view(*x.shape[:2], self.n_heads, self.d_nope + self.d_rope)
        q_nope, q_pe = q.split([self.d_nope, self.d_rope], dim=-1)
        q_pe = apply_rope(q_pe, cos_q, sin_q, self.interleave)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, T, d_c]
        k_pe = apply_rope(k_pe, cos, sin, self.interleave)  # [B, T, d_r]
        if cache is not None:
            c_kv, k_pe = cache.update(layer, positions, c_kv, k_pe, length)  # -> [B, S, d_c], [B, S, d_r]
        if self.indexer is not None:
            out = dsa.attend(self, x, q_latent, q_nope, q_pe, c_kv.to(x.dtype), k_pe.to(x.dtype), mask, cos, sin,
                             positions, cache, layer, length)
            if out is not None:
                return self.o_proj(out.flatten(2))
        if impl == "auto":
            impl = "absorb" if q.shape[1] == 1 else "naive"
        if impl == "absorb":
            out = self._absorbed(q_nope, q_pe, c_kv.to(x.dtype), k_pe.to(x.dtype), mask)  # [B, T, H, d_v]
        else:
            # keys are the T new tokens themselves (no cache, or a cache filled from position 0: length == T, as
            # every position must be < length), each queried: the mask is plain causal, which SDPA's fused
            # kernels can skip
            causal = (cache is None or length == x.shape[1]) and not keep
            out = self._naive(q_nope, q_pe, c_kv.to(x.dtype), k_pe.to(x.dtype), None if causal else mask)
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None) -> torch.Tensor:
        """Expand keys/values per head: k = [W_UK c ; k_pe], v = W_UV c; then softmax(q·k·scale) v.

        mask None: causal with S == T (is_causal lets the fused kernels skip the blocks above the diagonal)."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.d_nope + self.d_v)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)), dim=-1)  # [B, S, H, d_n+d_r]
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
        """Scores against the latent: (W_UKᵀ q_nope)·c + q_pe·k_pe; output W_UV (Σ p c)."""
        w = linear_weight(self.kv_b_proj).view(self.n_heads, self.d_nope + self.d_v, self.kv_lora_rank)
        w_uk, w_uv = w[:, :self.d_nope], w[:, self.d_nope:]  # [H, d_n, d_c], [H, d_v, d_c]
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk.to(q_nope.dtype))  # [B, T, H, d_c]
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, c_kv)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * self.softmax_scale
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)  # softmax in fp32 (official)
        o_lat = torch.einsum("bhts,bsc->bthc", probs, c_kv)  # [B, T, H, d_c]
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv.to(o_lat.dtype))
