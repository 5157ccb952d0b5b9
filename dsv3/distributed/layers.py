"""Tensor-parallel building blocks (Megatron-LM's column/row split, as DeepSeek's inference/model.py uses it).

Each is a thin subclass of the single-device module that holds one rank's slice of the weight; with world size 1
it holds the whole weight and calls no collective. Shapes: W ranks, r this rank, x: [..., in].

- ColumnParallelLinear: output features [r·out/W, (r+1)·out/W): y_r = x W_rᵀ, [..., out/W] (optionally gathered).
- RowParallelLinear: input features [r·in/W, (r+1)·in/W): y = Σ_r x_r W_rᵀ, one all-reduce (or left to the caller).
- VocabParallelEmbedding: vocabulary rows [r·V/W, (r+1)·V/W): each rank looks up its rows, zeros for the other
  ids, one all-reduce.

`shard_dim` names the weight dimension that is split (loading reads that slice of a checkpoint tensor, saving
concatenates the ranks' pieces along it). The collectives run under no_grad semantics: the parallel model is for
inference; training is data-parallel (data_parallel.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .init import active


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of x, in place (x itself without a process group)."""
    if active():
        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """[..., n] per rank -> [..., W·n], the ranks' pieces in rank order along the last dim."""
    if not active():
        return x
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, x.contiguous())
    return torch.cat(pieces, dim=-1)


def split(size: int, rank: int, world: int, field: str) -> tuple[int, int]:
    """[start, stop) of rank's equal share of `size`; ValueError naming `field` when W does not divide it."""
    if size % world:
        raise ValueError(f"{field}={size} is not divisible by the world size {world}: "
                         f"expected a world size that divides it")
    n = size // world
    return rank * n, (rank + 1) * n


def plain(module: nn.Module, kind: type) -> None:
    """ValueError unless `module` is exactly `kind` (nn.Linear, nn.Embedding): LoRA layers hold adapters that these
    slices do not cover (quantized linears have their own parallel forms, quantized.py)."""
    if type(module) is not kind:
        raise ValueError(f"{type(module).__name__} cannot be split across ranks: parallelize a model of plain "
                         f"{kind.__name__} or dsv3.quant layers (merge LoRA adapters first)")


def _slice(param: torch.Tensor | None, dim: int, start: int, stop: int) -> nn.Parameter | None:
    """A parameter holding only [start, stop) of `param` along `dim` (cloned: the full tensor can be freed)."""
    if param is None:
        return None
    return nn.Parameter(param.detach().narrow(dim, start, stop - start).clone(), requires_grad=param.requires_grad)


class ColumnParallelLinear(nn.Linear):
    """nn.Linear holding output features [start, stop): y_r = x W[start:stop]ᵀ (+ b[start:stop]): [..., out/W].

    gather_output: all-gather the ranks' outputs into the full [..., out] (the LM head's logits)."""

    shard_dim = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, world: int, field: str,
                    gather_output: bool = False) -> "ColumnParallelLinear":
        plain(linear, nn.Linear)
        start, stop = split(linear.out_features, rank, world, field)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, stop - start
        new.weight = _slice(linear.weight, 0, start, stop)
        new.bias = _slice(linear.bias, 0, start, stop)
        new.rank, new.world, new.gather_output = rank, world, gather_output
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return all_gather_last(y) if self.gather_output else y


class RowParallelLinear(nn.Linear):
    """nn.Linear holding input features [start, stop): y = Σ_r x_r W[:, start:stop]ᵀ + b.

    x: [..., in/W], this rank's share of the features (the output of a ColumnParallelLinear, or of its heads).
    The bias is added on rank 0 only, so the sum holds it once. reduce=False leaves the partial sum to the caller,
    which adds other partial sums before one all-reduce (the MoE's shared experts and its routed experts)."""

    shard_dim = 1

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, world: int, field: str,
                    reduce: bool = True) -> "RowParallelLinear":
        plain(linear, nn.Linear)
        start, stop = split(linear.in_features, rank, world, field)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = stop - start, linear.out_features
        new.weight = _slice(linear.weight, 1, start, stop)
        new.bias = linear.bias
        new.rank, new.world, new.reduce = rank, world, reduce
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.rank == 0 else None)
        return all_reduce(y) if self.reduce else y


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding holding vocabulary rows [start, stop): ids outside give zeros here, and the all-reduce adds the
    owner's row. ids: [B, T] -> [B, T, D]."""

    shard_dim = 0

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, rank: int, world: int, field: str) -> "VocabParallelEmbedding":
        plain(emb, nn.Embedding)
        start, stop = split(emb.num_embeddings, rank, world, field)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_embeddings, new.embedding_dim = stop - start, emb.embedding_dim
        new.padding_idx, new.max_norm, new.norm_type = None, None, 2.0
        new.scale_grad_by_freq, new.sparse = False, False
        new.weight = _slice(emb.weight, 0, start, stop)
        new.start, new.stop, new.rank, new.world = start, stop, rank, world
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        y = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        return all_reduce(y.masked_fill(outside[..., None], 0.0))
