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
from ..quant import QuantizedLinear
from .layers import VocabParallelEmbedding, plain, split
from .moe import ExpertParallelMoE, parallel_mlp
from .quantized import check_slice, column_parallel, row_parallel


# the modules parallelize slices (by their attribute names in dsv3/model.py, attention.py, layers.py)
SPLIT = frozenset({"embed_tokens", "lm_head", "q_proj", "q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj"})


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
    for name, module in model.named_modules():  # all checked before anything changes
        if name.rpartition(".")[2] in SPLIT and ".experts." not in name:
            if isinstance(module, QuantizedLinear):
                dim, field = role(name)
                check_slice(module, dim, world, name, field)
            else:
                plain(module, nn.Embedding if name.endswith("embed_tokens") else nn.Linear)
    model.model.embed_tokens = VocabParallelEmbedding.from_embedding(model.model.embed_tokens, rank, world,
                                                                      "vocab_size")
    model.lm_head = column_parallel(model.lm_head, rank, world, "lm_head", "vocab_size", gather_output=True)
    for prefix, blocks in (("model.layers", model.model.layers), ("mtp", model.mtp)):
        for i, block in enumerate(blocks):
            parallel_block(block, rank, world, f"{prefix}.{i}")
    model.parallel = (rank, world)
    return model


def role(name: str) -> tuple[int, str]:
    """(split dim, config field) of the SPLIT linear `name`: 1 for the row-parallel o_proj / down_proj."""
    leaf = name.rpartition(".")[2]
    dim = 1 if leaf in ("o_proj", "down_proj") else 0
    if leaf == "lm_head":
        return dim, "vocab_size"
    if leaf in ("q_proj", "q_b_proj", "kv_b_proj", "o_proj"):
        return dim, "num_attention_heads"
    return dim, "moe_intermediate_size * n_shared_experts" if ".shared_experts." in name else "intermediate_size"


def parallel_block(block: Block, rank: int, world: int, name: str) -> None:
    """One decoder block (or MTP module) `name` in place: attention heads, then its MLP or MoE."""
    parallel_attention(block.self_attn, rank, world, f"{name}.self_attn")
    if isinstance(block.mlp, MoE):
        block.mlp = ExpertParallelMoE.from_moe(block.mlp, rank, world, f"{name}.mlp")
    elif isinstance(block.mlp, MLP):
        parallel_mlp(block.mlp, rank, world, "intermediate_size", f"{name}.mlp")


def parallel_attention(attn: MLA, rank: int, world: int, prefix: str = "self_attn") -> None:
    """MLA (or SparseMLA) in place: this rank's H/W heads. Each head's rows are contiguous in q_(b_)proj
    ([H·(d_n+d_r), ·]) and kv_b_proj ([H·(d_n+d_v), d_c]) and its columns in o_proj ([D, H·d_v]), so an equal
    split of those dimensions is a split by heads."""
    field = "num_attention_heads"
    split(attn.n_heads, rank, world, field)
    name = "q_proj" if hasattr(attn, "q_proj") else "q_b_proj"
    setattr(attn, name, column_parallel(getattr(attn, name), rank, world, f"{prefix}.{name}", field))
    attn.kv_b_proj = column_parallel(attn.kv_b_proj, rank, world, f"{prefix}.kv_b_proj", field)
    attn.o_proj = row_parallel(attn.o_proj, rank, world, f"{prefix}.o_proj", field)
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
        if dim is None or tensor.dim() <= dim:  # a row-parallel layer's bias and int8 scales [out]: replicated
            out[name] = Shard(key, replicated=expert is None)
            continue
        n = tensor.shape[dim]  # packed tensors are cut in their own units (nibble bytes, groups, 128-blocks)
        rank = module.rank
        out[name] = Shard(key, dim, rank * n, (rank + 1) * n, replicated=False)
    return out
