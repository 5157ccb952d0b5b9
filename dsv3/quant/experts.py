"""Quantized routed experts, stacked: the MoE's gathered and grouped paths on int8 / int4 / fp8 experts.

A quantized model keeps its experts one `QuantizedLinear` each (the hub layout). Called one by one they cost a host
sync per layer and a kernel launch per used expert (the MoE's per-expert loop), which made eager quantized decoding
on an H200 2-4x slower than bf16 and batch 64 7-20x slower (docs/performance.md §B7), and a compiled graph ran every
expert on every row. Here, on a GPU, the experts' packed tensors are stacked per projection, [E, out, ...], in their
portable layouts, and each expert's buffers become views of the stack (no second copy); fp8 and int8 experts are
stacked on a CPU too (`stacks_on_cpu`). `QuantizedExpertStacks` takes the place of the MoE's `ExpertStacks`
(`stack_experts`), with the same interface, so the MoE's own paths run:
- gather (decoding): `GatheredRows[flat]` dequantises the N·K chosen experts' weights, [N·K, out, in]; inside a
  compiled graph inductor fuses the gather, the dequantisation and the matmul's reduction, so each chosen expert's
  weights are read once, at their packed size (gpt-fast's int8 Mixtral path);
- grouped (prefill, large batches): `dense(dtype)` dequantises every expert once, [E, out, in].
Dequantisation is the layer's own (`Int8Linear.dequantize`, `dequantize_groups`, `dequantize_fp8`) on stacked
tensors, so the stacked paths agree with the per-expert reference (tests/test_quant_experts.py).

Layouts: int8 `weight` [E, out, in] int8 + `weight_scale` [E, out]; int4 `qweight` [E, out, in_padded/2] uint8 (two
columns a byte, as on disk) + `scales`, `zeros` [E, out, groups] bf16; fp8 `weight` [E, out, in] e4m3 +
`weight_scale_inv` [E, ceil(out/128), ceil(in/128)]. Stacked int4 experts leave their kernel layout (tinygemm's tiles
cannot be gathered by expert); in the per-expert loop (training, LoRA) they dequantise.
"""

from __future__ import annotations

import sys
from itertools import chain

import torch
from torch import nn

from ..hub import FP8_BLOCK, dequantize_fp8_rows, scaled_block_rows
from ..moe import MoE
from .fp8 import FP8Linear
from .int4 import Int4Linear, dequantize_groups, unpack_nibbles
from .int8 import CPU_ALIGN, Int8Linear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ExpertStack:
    """One projection of E experts, quantized alike: the packed tensors stacked on a new first dim, [E, ...]."""

    def __init__(self, layers: list[nn.Module]) -> None:
        first, self.layers = layers[0], layers
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
            q, scale = t["weight"], t["weight_scale"]
            if scale.dtype == dtype:  # the same bits without a float32 copy: q is exact in dtype, one rounding
                return q.to(dtype) * scale[..., None]
            return (q.float() * scale.float()[..., None]).to(dtype)
        if self.scheme == "int4":  # groups along the input, as Int4Linear.dequantize
            q = unpack_nibbles(t["qweight"].flatten(0, 1))  # [n·out, in_padded] uint8
            n = q.shape[0] // self.out_features
            w = dequantize_groups(q.view(n, self.out_features, -1, self.group_size), t["scales"].float()[..., None],
                                  t["zeros"].float()[..., None])
            return w.view(n, self.out_features, -1)[..., :self.in_features].to(dtype)
        # fp8: 128x128 blocks, as dsv3.hub.dequantize_fp8: on a CPU by moving bits, where every expert's own layer
        # could (`row_scales`: no NaN codes, scales that do not overflow; kept current by each layer's placement)
        if (t["weight"].is_cpu and not torch.compiler.is_compiling()
                and all(layer.row_scales is not None for layer in self.layers)):
            return dequantize_fp8_rows(t["weight"], scaled_block_rows(t["weight_scale_inv"], self.out_features), dtype)
        scale = t["weight_scale_inv"].float().repeat_interleave(FP8_BLOCK, -2).repeat_interleave(FP8_BLOCK, -1)
        return (t["weight"].float() * scale[..., :self.out_features, :self.in_features]).to(dtype)

    def data_ptrs(self) -> tuple[int, ...]:
        return tuple(self.tensors[name].data_ptr() for name in self.names)


class GatheredRows:
    """Stacks of one or more projections [E, out_i, in] seen as one [E, Σ out_i, in] stack that dequantises the rows
    it is indexed by: `rows[flat]` -> [P, Σ out_i, in] in the layers' dtype, as the MoE's gather paths index a
    weight stack (dsv3/moe.py `routed_gather`, dsv3/fast/moe.py `fused_gather`)."""

    def __init__(self, stacks: list[ExpertStack], dtype: torch.dtype, experts: int) -> None:
        self.stacks, self.dtype = stacks, dtype
        self.shape = torch.Size((experts, sum(s.out_features for s in stacks), stacks[0].in_features))

    def __getitem__(self, idx: torch.Tensor | int) -> torch.Tensor:
        if isinstance(idx, int):
            return self[torch.tensor([idx], device=self.stacks[0].tensors[self.stacks[0].names[0]].device)][0]
        parts = [s.rows(idx, self.dtype) for s in self.stacks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# The routed path for quantized experts under `MoE.path = "auto"`, by (device is a CPU, torch._grouped_mm runs, N·K <=
# MoE.few_pairs), as dsv3/moe.py's AUTO_PATHS for plain ones. On a CPU each expert's own kernel (int8/int4 matvec,
# no host sync to fear) is faster than dequantising its weights for a few rows: int4 stacks are not built (`get`),
# int8 ones serve compiled graphs and many pairs (CPU_GROUPED_AUTO_PATHS). On a GPU a few pairs (decoding) gather
# and dequantise the chosen experts, with no host sync; many pairs (a prefill, a large batch) dequantise every expert
# once per layer and run the grouped matmuls (docs/performance.md §B7).
QUANTIZED_AUTO_PATHS: dict[tuple[bool, bool, bool], str] = {
    # (cpu,  grouped, few)
    (True, True, True): "loop", (True, True, False): "loop", (True, False, True): "loop", (True, False, False): "loop",
    (False, True, True): "gather", (False, True, False): "grouped",
    (False, False, True): "gather", (False, False, False): "loop",
}
# Experts stacked on a CPU whose layers dequantise for many rows: fp8 (no CPU kernel: each expert's own forward
# dequantises its weight anyway) and int8 where its dense path beats the kernel for many rows (`dense_above_rows`:
# AVX-512, not AVX2 with bf16). For many pairs the stacks dequantise every expert in one chain of ops per projection,
# not one per expert, and run the grouped matmuls (bundled model, AVX-512 EPYC, bf16, 256-token prefill against
# bf16's: fp8 1.60x -> 1.35x, stop 36; int8 1.22x -> 1.07x, stop 37). A few pairs take the expert layers (`get`,
# `stacks_on_cpu`); under an explicit path, or with `cpu`, a few gather.
CPU_GROUPED_AUTO_PATHS = QUANTIZED_AUTO_PATHS | {(True, True, True): "gather", (True, True, False): "grouped",
                                                 (True, False, True): "gather"}
# ... for experts of at most this many weights a layer: every expert dequantised at once is a temporary that size (in
# the compute dtype), which saves a small model's per-expert ops (the bundled model's: 0.8M). A large model's would
# take gigabytes (V2-Lite: 0.55G weights a layer, V3: 11G), and there each expert's work dwarfs its ops: the loop,
# whose layers dequantise their own weights in slabs (CPU_SLAB_ELEMENTS).
CPU_GROUPED_MAX_WEIGHTS = 1 << 24


class QuantizedExpertStacks:
    """For a MoE whose experts are quantized (`MoE.stacks`, installed by `stack_experts`): the experts' packed
    tensors stacked per projection (gate, up, down), the owner of their memory, with the interface of
    dsv3.moe.ExpertStacks: `get` -> (gate_up, down) as `GatheredRows` or None, `dense`, `drop`, `tensors`.

    `get` returns None (the MoE's per-expert loop) on a CPU unless `cpu` or `stacks_on_cpu` (and then not for a few
    pairs in eager), while gradients are on, or when the experts are not all QuantizedLinears of one scheme and
    shape (int4: one group size) without a bias. It rebuilds the stacks when an expert was replaced, moved or
    reloaded into new tensors since they were built.
    """

    def __init__(self, cpu: bool = False) -> None:
        self.cpu = cpu  # stack on a CPU whatever the scheme (explicit MoE paths, tests); "auto" still loops int8/4
        self.tensors: tuple[GatheredRows, GatheredRows] | None = None
        self.layers: list[tuple[nn.Module, ...]] = []
        self.projections: tuple[ExpertStack, ...] = ()

    def get(self, experts: nn.ModuleList, few_on_cpu: bool = False) -> tuple[GatheredRows, GatheredRows] | None:
        # called by every MoE forward: the cheap checks first, the full `stackable` scan only when (re)building
        first = experts[0]  # its tensors' device (buffers if quantized; parameters if replaced by a plain layer)
        if torch.is_grad_enabled() or (not self.cpu and (few_on_cpu or not stacks_on_cpu(first))
                                       and next(chain(first.buffers(), first.parameters())).is_cpu):
            return None
        if self.tensors is None or not self.current(experts):
            layers = stackable(experts)
            if layers is None:
                return None
            self.drop()
            self.layers = layers
            self.projections = tuple(ExpertStack([expert[i] for expert in layers]) for i in range(3))
            gate, up, down = self.projections
            dtype, n = layers[0][0].dtype, len(layers)
            self.tensors = GatheredRows([gate, up], dtype, n), GatheredRows([down], dtype, n)
        return self.tensors

    @property
    def auto_paths(self) -> dict[tuple[bool, bool, bool], str]:
        """What `MoE.path = "auto"` runs on these stacks (read once `get` has built them)."""
        if not self.layers:
            return QUANTIZED_AUTO_PATHS
        first = self.layers[0][0]
        dequantising = first.scheme == "fp8" or first.scheme == "int8" and first.dense_above_rows < sys.maxsize
        weights = len(self.layers) * sum(layer.out_features * layer.in_features for layer in self.layers[0])
        return CPU_GROUPED_AUTO_PATHS if dequantising and weights <= CPU_GROUPED_MAX_WEIGHTS else QUANTIZED_AUTO_PATHS

    def drop(self) -> None:
        self.tensors, self.layers, self.projections = None, [], ()

    def current(self, experts: nn.ModuleList) -> bool:
        """Whether the stacks still back these experts: the same modules (none replaced), and the first and last
        expert's buffers still views of the stacks (a move or a repack replaces every expert's, as in ExpertStacks;
        the MoE also drops its stacks on `.to` and load_state_dict)."""
        if len(experts) != len(self.layers) or any(
                layer is not expert._modules[p]
                for expert, layers in zip(experts, self.layers) for layer, p in zip(layers, PROJECTIONS)):
            return False
        return all(self.layers[e][i]._buffers[n].data_ptr() == stack.tensors[n][e].data_ptr()
                   for e in (0, -1) for i, stack in enumerate(self.projections) for n in stack.names)

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert dequantised: (gate_up [E, 2I, D], down [E, D, I]), for the grouped matmuls."""
        gate, up, down = self.projections
        return torch.cat((gate.rows(None, dtype), up.rows(None, dtype)), dim=1), down.rows(None, dtype)


def stacks_on_cpu(expert: nn.Module) -> bool:
    """Whether experts like this one stack on a CPU (for many pairs, and for compiled graphs, which then gather the
    chosen experts instead of running all of them; a few pairs in eager keep the expert layers, each dequantising
    only its own weight: 8% faster a bundled-model fp8 step than gathering from the stacks):
    - fp8: no CPU kernel, so each expert's forward dequantises anyway (CPU_GROUPED_AUTO_PATHS);
    - int8, where every expert's weight stays CPU_ALIGN-aligned as a view of the stack (`_weight_int8pack_mm` reads
      it with aligned vector loads; in eager "auto" keeps the experts' kernels for a few pairs);
    - not int4: its stacks hold the portable layout, and the experts would lose tinygemm's. Stacked in tinygemm's CPU
      layout instead, the experts keep their kernels, but inductor dequantises either layout in scalar loops: a
      bundled-model MoE's 4 gathered experts took 0.27-1.1 ms a token (int8's: 71 µs) and the compiled decode step
      7.7 ms against 4.1 running every expert's kernel (stop 37, docs/results.md)."""
    layers = [expert._modules.get(p) for p in PROJECTIONS]
    if all(isinstance(layer, FP8Linear) for layer in layers):
        return True
    return all(isinstance(layer, Int8Linear) and layer.out_features * layer.in_features % CPU_ALIGN == 0
               for layer in layers)


def stackable(experts: nn.ModuleList) -> list[tuple[nn.Module, ...]] | None:
    """[(gate, up, down) per expert] if every projection is a QuantizedLinear of one scheme, shape and group size
    across the experts, without a bias; else None."""
    layers = [tuple(expert._modules.get(p) for p in PROJECTIONS) for expert in experts]
    for i in range(3):
        kinds = {(type(e[i]), e[i].out_features, e[i].in_features, getattr(e[i], "group_size", None),
                  e[i].bias is None) if isinstance(e[i], (Int8Linear, Int4Linear, FP8Linear)) else None
                 for e in layers}
        if len(kinds) != 1 or None in kinds or not next(iter(kinds))[-1]:
            return None
    return layers


def stack_experts(model: nn.Module) -> None:
    """Give every MoE of `model` whose experts are quantized the quantized stacks (`quantize` and the quantized
    checkpoint loader call this)."""
    for module in model.modules():
        if isinstance(module, MoE) and stackable(module.experts) is not None:
            module.stacks = QuantizedExpertStacks()
