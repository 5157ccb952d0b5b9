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
        return self.down_proj(stored(F.silu(self.gate_proj(x)) * self.up_proj(x)))


def stored(x: torch.Tensor) -> torch.Tensor:
    """x itself; inside a torch.compile graph, also a hint that inductor should write x to memory once.

    On a GPU, a compiled decode step's one-row matmuls become inductor reductions (coordinate-descent tuning turns
    them into multiply-and-sum), and inductor inlines a small pointwise input into the reduction that reads it: the
    down projection then recomputes the SwiGLU hidden silu(gate)·up for each of its weight elements. For the routed
    experts of a V2-Lite-shaped layer at batch 1 that is 17M sigmoids for 12k outputs, and that kernel ran at
    1.6 TB/s on an H200 where the gate/up one before it reached 3.7 (bench/RESULTS.md). Fixing x's layout makes
    inductor store it instead. Eager, and where inductor stores x anyway (a library matmul's input; its CPU rules
    store a reused exp), it changes nothing. Only for tensors without gradients (inference): the op has no
    autograd formula, and a compiled training step keeps its intermediates for the backward anyway."""
    if torch.compiler.is_compiling() and not x.requires_grad:
        return torch.ops.prims.inductor_force_stride_order(x, x.stride())
    return x


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The dense [out, in] weight a linear-like module applies.

    Absorbed MLA folds kv_b_proj's weight into the query and output (dsv3/attention.py), so it needs the matrix
    itself, not just the module's forward. Quantized and LoRA-wrapped linears provide `effective_weight()`.
    """
    return linear.weight if isinstance(linear, nn.Linear) else linear.effective_weight()
