"""Small building blocks shared by attention, MoE and the model: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), normalised in float32 (HF and V3.2 do this; bf16 loses ~1e-3).

    The weight multiplies after the cast back to the input dtype, as transformers does, so bf16 results match it.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        if x.dtype == self.weight.dtype == torch.float32:  # nothing to cast: the weight goes into the fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        # F.rms_norm without a weight: x / sqrt(mean(x²) + eps) in one fused op (fewer launches per decode step)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x)) (paper-V3 eq. 12; official names w1/w3/w2).

    Used for the dense layers, for each routed expert and for the shared experts.
    """

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        return self.down_proj(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The SwiGLU hidden silu(gate(x)) · up(x): [..., inter_dim]."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The dense [out, in] weight a linear-like module applies.

    Absorbed MLA folds kv_b_proj's weight into the query and output (dsv3/attention.py), so it needs the matrix
    itself, not just the module's forward. Quantized and LoRA-wrapped linears provide `effective_weight()`.
    """
    return linear.weight if isinstance(linear, nn.Linear) else linear.effective_weight()
