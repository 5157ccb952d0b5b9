"""`plan(config, world_size, dtype)`: what one rank of a tensor + expert parallel run holds and sends, from the
config alone (nothing is built, so V3's 671B parameters cost nothing to plan).

The inventory below lists every weight of dsv3's Transformer with its shape on one rank, as `parallelize` splits
it (tests/test_distributed.py checks it against a parallelized model, tensor for tensor in bytes):
- split by W: embedding and LM head (vocabulary), q_(b_)proj / kv_b_proj / o_proj (heads), dense MLP and shared
  experts (intermediate width), routed experts (E/W whole experts per rank);
- replicated: q_a_proj, kv_a_proj_with_mqa, every norm, the router (fp32, bias included), MTP's eh_proj, DSA's
  indexer.
FP8 (DeepSeek-V3's checkpoint format, docs/architecture.md §6): the attention and MLP/expert projections are 1 byte
per weight plus one fp32 scale per 128x128 block of the rank's slice; embedding, head, router, norms and eh_proj
stay bf16. Activations, the latent cache and the collectives are bf16 for bf16 and FP8 weights, fp32 for fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from .parallelize import check_divisible

BLOCK = 128  # FP8 scale block (weight_block_size [128, 128])


@dataclass(frozen=True)
class Plan:
    """Bytes for one rank. sharded/replicated_bytes: weights split across ranks / held by every rank;
    latent_cache_bytes_per_token: c_kv + k_pe (+ the DSA indexer key) over the main layers, replicated on every rank
    (MLA's latent is shared by all heads); all_reduce_bytes_per_token: the payload of the per-token all-reduces
    (embedding, then attention and FFN of each main layer); gather_bytes_per_token: the logits all-gather."""
    world_size: int
    dtype: str
    sharded_bytes: int
    replicated_bytes: int
    latent_cache_bytes_per_token: int
    all_reduce_bytes_per_token: int
    gather_bytes_per_token: int

    @property
    def weight_bytes(self) -> int:
        return self.sharded_bytes + self.replicated_bytes


def inventory(config: ModelConfig, world: int) -> list[tuple[str, tuple[int, ...], bool, bool]]:
    """(kind, shape on one rank, split across ranks, FP8-quantisable) for every weight of the model."""
    c, W = config, world
    D, H, V = c.hidden_size, c.num_attention_heads, c.vocab_size
    out = [("embed", (V // W, D), True, False), ("head", (V // W, D), True, False), ("norm", (D,), False, False)]
    for layer in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        out += attention(c, W) + [("norm", (D,), False, False)] * 2
        if c.is_moe_layer(layer):
            I, E = c.moe_intermediate_size, c.n_routed_experts
            out += [("router", (E, D), False, False)]
            out += [("router", (E,), False, False)] if c.topk_method == "noaux_tc" else []
            out += [("expert", (I, D), True, True)] * (2 * E // W) + [("expert", (D, I), True, True)] * (E // W)
            if c.n_shared_experts:
                S = I * c.n_shared_experts // W
                out += [("mlp", (S, D), True, True)] * 2 + [("mlp", (D, S), True, True)]
        else:
            I = c.intermediate_size // W
            out += [("mlp", (I, D), True, True)] * 2 + [("mlp", (D, I), True, True)]
        if layer >= c.num_hidden_layers:  # MTP module: enorm, hnorm, eh_proj, shared_head.norm
            out += [("norm", (D,), False, False)] * 3 + [("eh_proj", (D, 2 * D), False, False)]
    return out


def attention(c: ModelConfig, W: int) -> list[tuple[str, tuple[int, ...], bool, bool]]:
    """One MLA layer's weights on one rank (q-LoRA or plain q_proj; DSA's indexer)."""
    D, h, bias = c.hidden_size, c.num_attention_heads // W, c.attention_bias
    out = []
    if c.q_lora_rank is None:
        out.append(("attn", (h * c.qk_head_dim, D), True, True))
    else:
        out += [("attn", (c.q_lora_rank, D), False, True), ("norm", (c.q_lora_rank,), False, False),
                ("attn", (h * c.qk_head_dim, c.q_lora_rank), True, True)]
        out += [("bias", (c.q_lora_rank,), False, False)] if bias else []
    out += [("attn", (c.kv_lora_rank + c.qk_rope_head_dim, D), False, True), ("norm", (c.kv_lora_rank,), False, False),
            ("attn", (h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), True, True),
            ("attn", (D, h * c.v_head_dim), True, True)]
    out += [("bias", (c.kv_lora_rank + c.qk_rope_head_dim,), False, False), ("bias", (D,), False, False)] if bias else []
    if c.uses_dsa:
        ih, d = c.index_n_heads, c.index_head_dim
        out += [("indexer", (ih * d, c.q_lora_rank), False, False), ("indexer", (d, D), False, False),
                ("indexer", (d,), False, False), ("indexer", (d,), False, False), ("indexer", (ih, D), False, False)]
    return out


def tensor_bytes(kind: str, shape: tuple[int, ...], quantisable: bool, dtype: torch.dtype) -> int:
    """Bytes of one weight: fp32 for the router, FP8 + block scales for quantisable ones under FP8."""
    n = 1
    for s in shape:
        n *= s
    if kind == "router":
        return 4 * n
    if dtype == torch.float8_e4m3fn:
        if not quantisable:
            return 2 * n
        return n + 4 * -(-shape[0] // BLOCK) * -(-shape[1] // BLOCK)
    return n * torch.empty((), dtype=dtype).element_size()


def plan(config: ModelConfig, world_size: int, dtype: torch.dtype = torch.bfloat16) -> Plan:
    """Bytes per rank of a `world_size`-rank run of `config` with weights in `dtype` (float32, bfloat16 or
    float8_e4m3fn). ValueError naming the field when world_size does not divide a split size."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float8_e4m3fn, got {dtype}")
    check_divisible(config, world_size)
    sharded = replicated = 0
    for kind, shape, split, quantisable in inventory(config, world_size):
        b = tensor_bytes(kind, shape, quantisable, dtype)
        sharded, replicated = (sharded + b, replicated) if split else (sharded, replicated + b)
    act = 4 if dtype == torch.float32 else 2
    c = config
    cache = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim + (c.index_head_dim or 0)) * act
    collective = world_size > 1
    return Plan(world_size, str(dtype).removeprefix("torch."), sharded, replicated, cache,
                (2 * c.num_hidden_layers + 1) * c.hidden_size * act if collective else 0,
                c.vocab_size * act if collective else 0)


def markdown_table(rows: list[tuple[str, Plan]]) -> str:
    """The docs' table (docs/distributed.md): one line per (label, plan), sizes in GB (10^9 bytes), per token in
    KB (10^3 bytes)."""
    lines = ["| run | W | weights | GB per rank: split | replicated | total | latent cache KB/token | "
             "all-reduce KB/token | logits gather KB/token |", "|---|---|---|---|---|---|---|---|---|"]
    for label, p in rows:
        lines.append(f"| {label} | {p.world_size} | {p.dtype} | {p.sharded_bytes / 1e9:.2f} | "
                     f"{p.replicated_bytes / 1e9:.2f} | {p.weight_bytes / 1e9:.2f} | "
                     f"{p.latent_cache_bytes_per_token / 1e3:.1f} | {p.all_reduce_bytes_per_token / 1e3:.1f} | "
                     f"{p.gather_bytes_per_token / 1e3:.1f} |")
    return "\n".join(lines)
