"""Quantized routed experts, stacked: the MoE's gathered and grouped paths on int8 / int4 / fp8 experts.

A quantized model keeps its experts one `QuantizedLinear` each (the hub layout). Called one by one they cost a host
sync per layer and a kernel launch per used expert (the MoE's per-expert loop), which made eager quantized decoding
on an H200 2-4x slower than bf16 and batch 64 7-20x slower (docs/performance.md §B7), and a compiled graph ran every
expert on every row. Here the experts' packed tensors are stacked per projection, [E, out, ...], in their portable
layouts, and each expert's buffers become views of the stack (no second copy). The MoE then asks for
- `gathered(flat, dtype)`: the dequantised weights of the N·K chosen experts, [N·K, out, in] per projection; inside a
  compiled graph inductor fuses the gather, the dequantisation and the matmul's reduction, so each chosen expert's
  weights are read once, at their packed size (gpt-fast's int8 Mixtral path), and
- `dense(dtype)`: every expert dequantised, [E, out, in], for the grouped matmuls of a prefill (each expert is used).
Dequantisation is the layer's own (`Int8Linear.dequantize`, `dequantize_groups`, `dequantize_fp8`) on stacked
tensors, so the stacked paths agree with the per-expert reference (tests/test_quant.py).

Layouts: int8 `weight` [E, out, in] int8 + `weight_scale` [E, out]; int4 `qweight` [E, out, in_padded/2] uint8 (two
columns a byte, as on disk) + `scales`, `zeros` [E, out, groups] bf16; fp8 `weight` [E, out, in] e4m3 +
`weight_scale_inv` [E, ceil(out/128), ceil(in/128)]. The int4 experts leave their kernel layout (tinygemm's tiles
cannot be gathered by expert): in the per-expert loop (training, LoRA) they dequantise, in the stacked paths their
stack is read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..hub import FP8_BLOCK
from .fp8 import FP8Linear
from .int4 import Int4Linear, dequantize_groups, unpack_nibbles
from .int8 import Int8Linear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ExpertStack:
    """One projection of E experts, quantized alike: the packed tensors stacked on a new first dim, [E, ...]."""

    def __init__(self, layers: list[nn.Module]) -> None:
        first = layers[0]
        self.scheme, self.out_features, self.in_features = first.scheme, first.out_features, first.in_features
        self.group_size = getattr(first, "group_size", None)
        with torch.no_grad(), torch.inference_mode(False):
            for layer in layers:  # tinygemm's tiles hold no expert-indexable rows: the portable layout
                if isinstance(layer, Int4Linear) and layer.layout != "plain":
                    layer._unpack_kernel()
            self.names = [name for name, t in first._buffers.items() if t is not None and name != "bias"]
            self.tensors = {name: torch.stack([layer._buffers[name] for layer in layers]) for name in self.names}
            for e, layer in enumerate(layers):  # each expert's buffers become views of the stack: one copy in memory
                for name in self.names:
                    layer._buffers[name] = self.tensors[name][e]
                if isinstance(layer, Int4Linear):
                    layer.kernel_ready = False  # its stack, not tinygemm, runs it (the loop path dequantises)

    def rows(self, idx: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Dequantised weights of experts idx [n] (all E when None): [n, out, in] in dtype."""
        t = self.tensors if idx is None else {name: tensor[idx] for name, tensor in self.tensors.items()}
        if self.scheme == "int8":  # q · scale per output row, as Int8Linear.dequantize
            return (t["weight"].float() * t["weight_scale"].float()[..., None]).to(dtype)
        if self.scheme == "int4":  # groups along the input, as Int4Linear.dequantize
            q = unpack_nibbles(t["qweight"].flatten(0, 1)).float()  # [n·out, in_padded]
            n = q.shape[0] // self.out_features
            w = dequantize_groups(q.view(n, self.out_features, -1, self.group_size), t["scales"].float()[..., None],
                                  t["zeros"].float()[..., None])
            return w.view(n, self.out_features, -1)[..., :self.in_features].to(dtype)
        # fp8: 128x128 blocks, as dsv3.hub.dequantize_fp8
        scale = t["weight_scale_inv"].float().repeat_interleave(FP8_BLOCK, -2).repeat_interleave(FP8_BLOCK, -1)
        return (t["weight"].float() * scale[..., :self.out_features, :self.in_features]).to(dtype)

    def data_ptrs(self) -> tuple[int, ...]:
        return tuple(self.tensors[name].data_ptr() for name in self.names)


class QuantizedExperts:
    """The stacks of a MoE's quantized experts (gate, up, down), the owner of their memory.

    `build(experts)` returns None unless every expert projection is a QuantizedLinear of one scheme and shape
    (int4: one group size) without a bias; the MoE then keeps its per-expert loop.
    """

    def __init__(self, experts: nn.ModuleList) -> None:
        self.layers = [tuple(expert._modules[p] for p in PROJECTIONS) for expert in experts]
        self.gate, self.up, self.down = (ExpertStack([layers[i] for layers in self.layers]) for i in range(3))

    @classmethod
    def build(cls, experts: nn.ModuleList) -> "QuantizedExperts | None":
        for i in range(3):
            layers = [expert._modules.get(PROJECTIONS[i]) for expert in experts]
            kinds = {(type(m), m.out_features, m.in_features, getattr(m, "group_size", None), m.bias is None)
                     for m in layers}
            if len(kinds) != 1 or next(iter(kinds))[0] not in (Int8Linear, Int4Linear, FP8Linear) \
                    or not next(iter(kinds))[-1]:
                return None
        return cls(experts)

    def current(self, experts: nn.ModuleList) -> bool:
        """Whether the stacks still back these experts (not replaced, moved or reloaded since `build`)."""
        return all(layer is expert._modules[p] and all(layer._buffers[n].data_ptr() == stack.tensors[n][e].data_ptr()
                                                        for n in stack.names)
                   for e, expert in enumerate(experts)
                   for layer, p, stack in zip(self.layers[e], PROJECTIONS, (self.gate, self.up, self.down)))

    def gathered(self, flat: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """flat: [P] expert ids -> dequantised (gate [P, I, D], up [P, I, D], down [P, D, I])."""
        return self.gate.rows(flat, dtype), self.up.rows(flat, dtype), self.down.rows(flat, dtype)

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert dequantised: (gate_up [E, 2I, D], down [E, D, I]), the stacks `MoE.routed_grouped` takes."""
        return torch.cat((self.gate.rows(None, dtype), self.up.rows(None, dtype)), dim=1), self.down.rows(None, dtype)

    def routed_gather(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x: [N, D], weights/indices: [N, K] -> Σ_k w_k FFN_{i_k}(x): [N, D] from the N·K chosen experts' rows
        (the decode path; static shapes, no host sync)."""
        N, K = indices.shape
        gate, up, down = self.gathered(indices.flatten(), x.dtype)
        xs = x.repeat_interleave(K, dim=0)[:, :, None]  # [N·K, D, 1]: token n's row for each of its K experts
        h = F.silu(torch.bmm(gate, xs)) * torch.bmm(up, xs)  # [N·K, I, 1]
        y = torch.bmm(down, h).squeeze(-1)  # [N·K, D]
        return (y.view(N, K, -1) * weights[:, :, None].to(x.dtype)).sum(dim=1)
