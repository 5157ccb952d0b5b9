"""Tensor-parallel forms of the quantized linears (dsv3/quant/): the packed weight is sliced with its scales, so a
rank holds 1/W of the quantized bytes and computes with the layer's own forward (kernel, dense or reference path).

Each parallel class is the quantized class with a mixin that adds only the collective (layers.py's split):
- column-parallel (output rows [r·out/W, (r+1)·out/W)): every format stores its scales per output row, so the rows
  come with their scales: int8 `weight_scale[rows]`, int4 `scales`/`zeros[rows]`, fp8 `weight_scale_inv` rows of
  whole 128-row blocks (the slice must be a multiple of 128 rows);
- row-parallel (input columns [r·in/W, (r+1)·in/W)): int8's per-row scale covers every column, so it is replicated;
  int4 takes whole groups (the slice must be a multiple of group_size) and fp8 whole 128-column blocks.
A slice that would cut a group or block is refused with the layer's name and the sizes. The row-parallel bias is
kept on rank 0 and held as zeros on the others (y + 0 is exact), so the all-reduce adds it once while the layer's
forward stays the quantized class's own. Routed experts need no form here: expert parallelism owns whole experts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hub import FP8_BLOCK
from ..quant import FP8Linear, Int4Linear, Int8Linear, QuantizedLinear
from .layers import ColumnParallelLinear, RowParallelLinear, all_gather_last, all_reduce, split


def unit(layer: QuantizedLinear) -> tuple[str, int]:
    """(what, size): the run of weights along the input that one scale covers, for the error message."""
    if isinstance(layer, Int4Linear):
        return f"int4 group_size {layer.group_size}", layer.group_size
    if isinstance(layer, FP8Linear):
        return f"fp8 block {FP8_BLOCK}", FP8_BLOCK
    return "int8", 1


def check_slice(layer: QuantizedLinear, dim: int, world: int, name: str, field: str) -> tuple[int, int]:
    """(start, stop) of rank 0's slice along dim; ValueError naming `name` when the slice cuts a group or block.
    int8 has no blocks; int4 has groups along the input only (its rows split freely); fp8 has 128x128 blocks."""
    size = layer.out_features if dim == 0 else layer.in_features
    start, stop = split(size, 0, world, field)
    what, block = unit(layer)
    if isinstance(layer, Int4Linear) and dim == 0:
        block = 1
    if (stop - start) % block:
        kind = "column-parallel output" if dim == 0 else "row-parallel input"
        raise ValueError(f"{what} does not divide the {kind} slice {stop - start} of {name}: expected a world size "
                         f"that leaves whole {block}-wide {'groups' if block != FP8_BLOCK else 'blocks'} per rank")
    return start, stop


def packed_tensors(layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    """The layer's stored tensors without the bias, in the portable layout (int4: nibbles two a byte)."""
    if isinstance(layer, Int4Linear):
        return dict(zip(("qweight", "scales", "zeros"), layer._portable()))
    return {name: t for name, t in layer._buffers.items() if t is not None}


def sliced(layer: QuantizedLinear, cls: type, dim: int, start: int, stop: int) -> QuantizedLinear:
    """A `cls` (the parallel form of layer's class) holding [start, stop) along dim of layer's weight with the
    matching scales (each tensor cut in its own units: bytes of two nibbles, groups, 128-blocks, rows)."""
    out_f, in_f = (stop - start, layer.in_features) if dim == 0 else (layer.out_features, stop - start)
    bias = None if layer.bias is None else (layer.bias.detach() if dim == 1 else layer.bias.detach()[start:stop])
    device = next(iter(layer.buffers())).device
    extra = {"group_size": layer.group_size} if isinstance(layer, Int4Linear) else {}
    new = cls(in_f, out_f, dtype=layer.dtype, bias=None if bias is None else bias.clone(), device="meta", **extra)
    full = layer.out_features if dim == 0 else layer.in_features
    for name, tensor in packed_tensors(layer).items():
        if tensor.dim() <= dim:  # int8's per-row scale under a row split: replicated
            piece = tensor
        else:
            n = tensor.shape[dim]  # this tensor's units along dim: full / n weights each (1, 2, group, 128)
            per = -(-full // n)
            piece = tensor.narrow(dim, start // per, -(-(stop - start) // per))
        new._buffers[name] = piece.detach().clone().to(device)
    new.impl = layer.impl
    new._place()
    return new


class _Column:
    """Output rows [start, stop) of a quantized linear; gather_output all-gathers [..., out/W] into [..., out]."""

    shard_dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return all_gather_last(y) if self.gather_output else y


class _Row:
    """Input columns [start, stop) of a quantized linear: y = Σ_r x_r W[:, start:stop]ᵀ (+ b on rank 0)."""

    shard_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return all_reduce(y) if self.reduce else y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.rank != 0 and self.bias is not None:  # the checkpoint's bias, added once (on rank 0)
            self.bias = nn.Parameter(torch.zeros_like(self.bias), requires_grad=False)


class ColumnParallelInt8Linear(_Column, Int8Linear):
    pass


class ColumnParallelInt4Linear(_Column, Int4Linear):
    pass


class ColumnParallelFP8Linear(_Column, FP8Linear):
    pass


class RowParallelInt8Linear(_Row, Int8Linear):
    pass


class RowParallelInt4Linear(_Row, Int4Linear):
    pass


class RowParallelFP8Linear(_Row, FP8Linear):
    pass


PARALLEL = {(Int8Linear, 0): ColumnParallelInt8Linear, (Int4Linear, 0): ColumnParallelInt4Linear,
            (FP8Linear, 0): ColumnParallelFP8Linear, (Int8Linear, 1): RowParallelInt8Linear,
            (Int4Linear, 1): RowParallelInt4Linear, (FP8Linear, 1): RowParallelFP8Linear}


def parallel_quantized(layer: QuantizedLinear, dim: int, rank: int, world: int, name: str, field: str, *,
                       gather_output: bool = False, reduce: bool = True) -> QuantizedLinear:
    """Rank `rank`'s column- (dim 0) or row-parallel (dim 1) share of a quantized linear."""
    start, stop = check_slice(layer, dim, world, name, field)
    n = stop - start
    new = sliced(layer, PARALLEL[type(layer), dim], dim, rank * n, (rank + 1) * n)
    new.rank, new.world, new.gather_output, new.reduce = rank, world, gather_output, reduce
    if dim == 1 and rank != 0 and new.bias is not None:  # added once, by rank 0 (_Row)
        new.bias = nn.Parameter(torch.zeros_like(new.bias), requires_grad=False)
    return new


def column_parallel(linear: nn.Module, rank: int, world: int, name: str, field: str,
                    gather_output: bool = False) -> nn.Module:
    """The column-parallel form of a plain or quantized linear (`name` for the error of a cut block)."""
    if isinstance(linear, QuantizedLinear):
        return parallel_quantized(linear, 0, rank, world, name, field, gather_output=gather_output)
    return ColumnParallelLinear.from_linear(linear, rank, world, field, gather_output)


def row_parallel(linear: nn.Module, rank: int, world: int, name: str, field: str, reduce: bool = True) -> nn.Module:
    """The row-parallel form of a plain or quantized linear."""
    if isinstance(linear, QuantizedLinear):
        return parallel_quantized(linear, 1, rank, world, name, field, reduce=reduce)
    return RowParallelLinear.from_linear(linear, rank, world, field, reduce)


def own_storage(layer: nn.Module) -> None:
    """Give a quantized expert's buffers their own memory: after dsv3.quant.experts stacked them they are views of
    the [E, ...] stacks, which would keep every expert's bytes alive on a rank that owns E/W of them."""
    for name, tensor in layer._buffers.items():
        if tensor is not None and tensor.device.type != "meta" and \
                tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
            layer._buffers[name] = tensor.clone()
