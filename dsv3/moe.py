"""DeepSeekMoE: router (paper-V3 §2.1.2 eqs. 12-16), shared + routed SwiGLU experts.

Shapes: N tokens (B·T flattened), D hidden, E routed experts, K experts per token, G groups.
Facts: ../shared/reference/architecture.md §3. Routing per `topk_method`:
- noaux_tc (V3): s = sigmoid(x·Wᵀ); the correction bias b is added for *selection only*; a group scores the sum
  of its top-2 biased affinities; the best `topk_group` groups are kept (others masked with -inf, as the official
  code since commit 1398800); top-K experts; weights are the *unbiased* s of the chosen experts, normalised when
  `norm_topk_prob`, times `routed_scaling_factor`.
- greedy (V2-Lite): softmax affinities, plain top-K.  group_limited_greedy (V2): a group scores its max affinity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP


class Gate(nn.Module):
    """Router. weight: [E, D]; e_score_correction_bias: [E] float32 buffer (moved by balancing, not by gradients)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scoring_func, self.topk_method = config.scoring_func, config.topk_method
        self.norm_topk_prob, self.route_scale = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s: [N, E] in float32 (router logits in fp32, as transformers and V3.2 compute them)."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, D] -> weights [N, K] float32, indices [N, K] int64, affinities s [N, E] float32."""
        s = self.scores(x)
        choice = s if self.e_score_correction_bias is None else s + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(choice.shape[0], self.n_group, -1)  # [N, G, E/G]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
            else:
                group_scores = grouped.amax(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices  # [N, K]
        weights = s.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # eps: all-underflow guard (HF)
        return weights * self.route_scale, indices, s


class MoE(nn.Module):
    """y = Σ_shared FFN(x) + Σ_k g_k FFN_{i_k}(x) (eq. 12). Experts are stored one module each, as the hub does.

    In training mode the forward leaves two things for the trainer (paper-V3 §2.1.2):
    `last_load` [E] — tokens routed to each expert in this batch (for the bias update), and
    `last_balance_loss` — the sequence-wise balance loss Σ_i f_i P_i averaged over sequences (eqs. 17-20), unscaled.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.gate = Gate(config)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.n_routed_experts))
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)
        self.last_load: torch.Tensor | None = None
        self.last_balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, s = self.gate(flat)
        y = self.routed(flat, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:
            self._record_balance(s.view(B, T, -1), indices.view(B, T, -1))
        return y.view(B, T, D)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch: sort the N·K (token, expert) pairs by expert, one matmul chain per used expert."""
        order = indices.flatten().argsort()  # pairs sorted by expert
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts).tolist()
        token = order // self.top_k  # which token each sorted pair belongs to
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = token[start:start + n]
            w = weights.flatten()[order[start:start + n]]
            out.index_add_(0, idx, self.experts[e](x[idx]) * w[:, None].to(x.dtype))
            start += n
        return out

    def routed_reference(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Plain per-token loop over its K experts; the definition `routed` must agree with."""
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(indices.shape[1]):
                out[t] += weights[t, k].to(x.dtype) * self.experts[int(indices[t, k])](x[t])
        return out

    def _record_balance(self, s: torch.Tensor, indices: torch.Tensor) -> None:
        """s: [B, T, E] affinities, indices: [B, T, K]. f_i = E/(K·T) Σ_t 1[i chosen], P_i = mean_t s'_i."""
        B, T, E = s.shape
        chosen = torch.zeros(B, T, E, device=s.device).scatter_(2, indices, 1.0)
        self.last_load = chosen.sum(dim=(0, 1)).detach()
        f = chosen.sum(dim=1) * E / (self.top_k * T)  # [B, E], no gradient (an indicator)
        p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
        self.last_balance_loss = (f * p).sum(dim=-1).mean()
