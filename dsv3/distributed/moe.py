"""Expert parallelism (paper-V3 §3.4: EP across nodes; DeepSeek's inference/model.py splits experts the same way).

Rank r of W owns the routed experts [r·E/W, (r+1)·E/W). The router is replicated, so every rank routes every token
identically; each rank then runs only the (token, expert) pairs of its own experts, through the single-device MoE's
`routed` paths (loop / pairs / gather / grouped, unchanged), and adds its share of the shared experts (a
tensor-parallel MLP whose down projection is left unreduced). One all-reduce sums the W partial outputs:
    y = Σ_r [ Σ_{(t,k): i_tk owned by r} g_tk FFN_{i_tk}(x_t)  +  down_r(hidden_r(x_t)) ].
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..moe import MoE
from ..quant import QuantizedLinear
from .layers import all_reduce, plain, split
from .quantized import column_parallel, own_storage, row_parallel


class ExpertParallelMoE(MoE):
    """MoE holding experts [first_expert, first_expert + n_experts) of n_routed; `experts[i]` is global expert
    first_expert + i. `n_experts` counts the local experts (the routed paths size their counts by it)."""

    @classmethod
    def from_moe(cls, moe: MoE, rank: int, world: int, name: str = "mlp") -> "ExpertParallelMoE":
        """Take this rank's experts out of `moe` (its other experts are dropped) and split its shared experts.
        Quantized experts move whole, packed weights and scales alike (`name`: the MoE's, for errors)."""
        start, stop = split(moe.n_experts, rank, world, "n_routed_experts")
        for expert in moe.experts:
            for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
                if not isinstance(linear, QuantizedLinear):
                    plain(linear, nn.Linear)
        for expert in moe.experts[start:stop]:
            for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
                own_storage(linear)
        new = cls.__new__(cls)
        new.__dict__.update(moe.__dict__)
        new._modules = dict(moe._modules)
        new.experts = nn.ModuleList(moe.experts[start:stop])
        new.n_routed, new.first_expert, new.n_experts = moe.n_experts, start, stop - start
        new.stacks = copy.copy(moe.stacks)  # same kind and options; over the local experts only, built on first use
        new.stacks.drop()
        if moe.shared_experts is not None:
            parallel_mlp(moe.shared_experts, rank, world, "moe_intermediate_size * n_shared_experts",
                         f"{name}.shared_experts", reduce=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, s = self.gate(flat)  # [N, K] over all n_routed experts, the same on every rank
        y = self.local_routed(flat, weights, indices, decode_step=T == 1)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)  # this rank's partial sum (RowParallelLinear, reduce=False)
        if self.training:
            self._record_balance(s.view(B, T, -1), indices.view(B, T, -1))
        return all_reduce(y).view(B, T, D)

    def local_routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *,
                     decode_step: bool = False) -> torch.Tensor:
        """x: [N, D], weights/indices: [N, K] (global expert ids) -> Σ over the pairs whose expert is local of
        w · FFN(x): [N, D]. The P local pairs run as P one-expert rows ([P, 1] weights and local ids) through
        `MoE.routed`, then add back into their tokens' rows."""
        local = (indices >= self.first_expert) & (indices < self.first_expert + self.n_experts)
        token, k = local.nonzero(as_tuple=True)  # [P] each (the pair count is read on the host, like the loop path)
        out = torch.zeros_like(x)
        if token.numel() == 0:
            return out
        y = self.routed(x.index_select(0, token), weights[token, k][:, None],
                        (indices[token, k] - self.first_expert)[:, None], decode_step=decode_step)
        return out.index_add_(0, token, y)


def parallel_mlp(mlp: nn.Module, rank: int, world: int, field: str, name: str = "mlp", reduce: bool = True) -> None:
    """SwiGLU MLP in place: gate/up column-parallel, down row-parallel (reduce=False: the caller all-reduces);
    plain or quantized linears (`name`: the MLP's, for errors)."""
    mlp.gate_proj = column_parallel(mlp.gate_proj, rank, world, f"{name}.gate_proj", field)
    mlp.up_proj = column_parallel(mlp.up_proj, rank, world, f"{name}.up_proj", field)
    mlp.down_proj = row_parallel(mlp.down_proj, rank, world, f"{name}.down_proj", field, reduce=reduce)
