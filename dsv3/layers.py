"""Small building blocks shared by attention, MoE and the model: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), normalised in float32 (HF and V3.2 do this; bf16 loses ~1e-3).

    The weight multiplies after the cast back to the input dtype, as transformers does, so bf16 results match it.
    Written as ‖x‖ (one `vector_norm` reduction) and x · rsqrt(‖x‖²/dim + eps) (one `addcmul`, one `rsqrt`)
    rather than `F.rms_norm`, which a CPU runs as a composite of ~14 ops (pow, mean, add, rsqrt, casts...): in an
    eager CPU decode step each op costs ~8 µs, and this form made the bundled model's step ~5% faster
    (docs/results.md).
    Equal to `rms_norm_reference` (`F.rms_norm`) up to float32 rounding (tests/test_model.py); compiled graphs use
    that (dsv3/fast/layers.py), which inductor fuses into one kernel anyway.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, eps: float) -> None:
        # kept as a float32 CPU scalar tensor, which addcmul takes beside tensors on any device. Not a buffer:
        # `.to(dtype)` would round it, and it is no state; device="cpu" under a meta-device construction too.
        self._eps, self.eps_tensor = eps, torch.tensor(eps, dtype=torch.float32, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        xf = x if x.dtype == torch.float32 else x.float()
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)  # ‖x‖: [..., 1]
        y = xf * torch.addcmul(self.eps_tensor, norm, norm, value=1 / x.shape[-1]).rsqrt_()  # x / sqrt(mean(x²) + eps)
        if x.dtype == self.weight.dtype == torch.float32:
            return y * self.weight
        return self.weight * y.to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm through `F.rms_norm`, normalising in float32 with the weight after the cast back: x: [..., dim]."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


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
