"""`parallelize(model)`: one rank's share of a Transformer, converted in place (tensor + expert parallelism).

What each rank holds (W ranks, r this rank; DeepSeek's inference/model.py splits the same way):
- embedding: vocabulary rows [r·V/W, (r+1)·V/W) (VocabParallelEmbedding, one all-reduce);
- MLA: heads [r·H/W, (r+1)·H/W): q_proj / q_b_proj and kv_b_proj column-parallel by head, o_proj row-parallel
  (one all-reduce). q_a_proj, kv_a_proj_with_mqa and their norms are replicated, and so is the latent cache: the
  compressed latent c_kv and the rope key k_pe are shared by *all* heads (paper-V3 §2.1.1 eqs. 1-3; MQA-style),
  so every rank needs all of it and a per-head split would not shrink it. DSA's lightning indexer (its own heads
  score tokens for every query head) is replicated too;
- dense MLP and shared experts: gate/up column-parallel, down row-parallel;
- routed experts: [r·E/W, (r+1)·E/W) (ExpertParallelMoE), router replicated;
- LM head: vocabulary rows, logits all-gathered; norms, MTP's eh_proj and RoPE tables replicated.
Two all-reduces per block (attention, FFN), as in DeepSeek's code. The parallel model runs inference: gradients
do not flow through the collectives (training is data-parallel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..attention import MLA
from ..config import ModelConfig
from ..layers import MLP
from ..model import Block, Transformer
from ..moe import MoE
from .init import rank as current_rank
from .init import world_size as current_world
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, split
from .moe import ExpertParallelMoE, parallel_mlp


def check_divisible(config: ModelConfig, world: int) -> None:
    """ValueError naming the first config field that `world` ranks cannot split evenly."""
    fields = {"num_attention_heads": config.num_attention_heads, "vocab_size": config.vocab_size,
              "intermediate_size": config.intermediate_size}
    if config.n_routed_experts and (config.num_hidden_layers > config.first_k_dense_replace
                                    or config.num_nextn_predict_layers):
        fields["n_routed_experts"] = config.n_routed_experts
        fields["moe_intermediate_size * n_shared_experts"] = config.moe_intermediate_size * config.n_shared_experts
    for field, size in fields.items():
        if size:
            split(size, 0, world, field)


def parallelize(model: Transformer, rank: int | None = None, world: int | None = None) -> Transformer:
    """Replace `model`'s modules by rank `rank`'s shares (default: this process's rank and world size) and return
    it. World size 1 returns the model unchanged. Works on a meta-device model too (the loader builds one and then
    reads only these slices, dsv3/checkpoint.py)."""
    rank = current_rank() if rank is None else rank
    world = current_world() if world is None else world
    if world == 1:
        return model
    check_divisible(model.config, world)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            raise ValueError(f"{name}: {type(module).__name__} cannot be split across ranks; parallelize a model "
                             "of plain nn.Linear layers (unquantized, LoRA merged)")
    model.model.embed_tokens = VocabParallelEmbedding.from_embedding(model.model.embed_tokens, rank, world,
                                                                      "vocab_size")
    model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, rank, world, "vocab_size", gather_output=True)
    for block in [*model.model.layers, *model.mtp]:
        parallel_block(block, rank, world)
    model.parallel = (rank, world)
    return model


def parallel_block(block: Block, rank: int, world: int) -> None:
    """One decoder block (or MTP module) in place: attention heads, then its MLP or MoE."""
    parallel_attention(block.self_attn, rank, world)
    if isinstance(block.mlp, MoE):
        block.mlp = ExpertParallelMoE.from_moe(block.mlp, rank, world)
    elif isinstance(block.mlp, MLP):
        parallel_mlp(block.mlp, rank, world, "intermediate_size")


def parallel_attention(attn: MLA, rank: int, world: int) -> None:
    """MLA (or SparseMLA) in place: this rank's H/W heads. Each head's rows are contiguous in q_(b_)proj
    ([H·(d_n+d_r), ·]) and kv_b_proj ([H·(d_n+d_v), d_c]) and its columns in o_proj ([D, H·d_v]), so an equal
    split of those dimensions is a split by heads."""
    field = "num_attention_heads"
    split(attn.n_heads, rank, world, field)
    name = "q_proj" if hasattr(attn, "q_proj") else "q_b_proj"
    setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), rank, world, field))
    attn.kv_b_proj = ColumnParallelLinear.from_linear(attn.kv_b_proj, rank, world, field)
    attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, rank, world, field)
    attn.n_heads //= world


@dataclass(frozen=True)
class Shard:
    """Where a rank's tensor sits in the full one: `key` (the single-device state-dict name), and for a split
    tensor the dimension `dim` and rows/columns [start, stop) along it (dim None: the whole tensor).
    replicated: every rank holds this same tensor (False for split tensors and for a rank's own experts)."""
    key: str
    dim: int | None = None
    start: int = 0
    stop: int = 0
    replicated: bool = True


_EXPERT = re.compile(r"(.*\.experts\.)(\d+)(\..*)")


def shards(model: nn.Module) -> dict[str, Shard]:
    """For each entry of a (parallelized) model's state dict: its Shard of the single-device state dict."""
    out: dict[str, Shard] = {}
    modules = dict(model.named_modules())
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        key, expert = name, _EXPERT.match(name)
        if m := expert:  # a local expert: global id = first_expert + local id
            first = getattr(modules[m.group(1)[:-len(".experts.")]], "first_expert", 0)
            key = f"{m.group(1)}{first + int(m.group(2))}{m.group(3)}"
        dim = getattr(module, "shard_dim", None)
        if dim is None or (leaf == "bias" and dim == 1) or leaf not in ("weight", "bias"):
            out[name] = Shard(key, replicated=expert is None)
            continue
        dim = 0 if leaf == "bias" else dim
        n = tensor.shape[dim]
        rank = module.rank
        out[name] = Shard(key, dim, rank * n, (rank + 1) * n, replicated=False)
    return out
