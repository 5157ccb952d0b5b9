"""Tensor and expert parallelism over torch.distributed (docs/distributed.md): `init` from torchrun's environment,
`parallelize` a loaded model into this rank's share, the parallel layers, and `plan` (bytes per rank)."""

from .init import active, device, init, rank, world_size
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, all_gather_last, all_reduce
from .moe import ExpertParallelMoE
from .parallelize import Shard, check_divisible, parallelize, shards
from .plan import Plan, plan

__all__ = ["ColumnParallelLinear", "ExpertParallelMoE", "Plan", "RowParallelLinear", "Shard",
           "VocabParallelEmbedding", "active", "all_gather_last", "all_reduce", "check_divisible", "device", "init",
           "parallelize", "plan", "rank", "shards", "world_size"]
