"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp): a lightning indexer picks, per query, the top-k earlier
tokens, and MLA attends over those latent entries only.

Facts: docs/architecture.md §8; V3.2 report (DeepSeek_V3_2.pdf) eq. 1 and §2.1; transformers'
`DeepseekV32Indexer` for the weight names (`self_attn.indexer.wq_b`, `wk`, `k_norm`, `weights_proj`).

Shapes: B batch, T queries, S keys (visible cache slots), H MLA heads, H_I indexer heads, d_I index_head_dim,
d_c kv_lora_rank, d_r qk_rope_head_dim, k the token budget (index_topk, or fewer keys when fewer are visible).

- Indexer: q^I = wq_b(c_q) from MLA's query latent c_q = q_a_layernorm(q_a_proj(x)); one shared key
  k^I = LayerNorm(wk(x)); per-head weights w = weights_proj(x)·H_I^-½·d_I^-½. RoPE on the first d_r dims of q^I
  and k^I, NOT interleaved (unlike MLA's; the Nov-2025 fix of the reference code). Score (eq. 1):
  I[t, s] = Σ_h w[t, h]·ReLU(q^I[t, h]·k^I[s]), causal.
- Indexer precision (`Indexer.precision`, `set_indexer_precision`): "bf16" (default) scores the unquantised q^I/k^I
  in fp32, as transformers' DeepseekV32Indexer does (it skips the rotation and FP8, see its forward's docstring).
  "fp8" is the V3.2-Exp inference path (inference/model.py `Indexer.forward`, inference/kernel.py `act_quant`,
  `fp8_index`): after RoPE, q^I and k^I are rotated by the normalised Walsh–Hadamard transform (`rotate_activation`;
  orthogonal, so the dot products are unchanged, but an outlier channel is spread over all d_I dims), then rounded
  to float8_e4m3fn with one scale per token per 128-dim block (`fp8_round`); the keys are cached rounded.
- Sparse MLA runs in the absorbed (MQA) form, as V3.2 does: gather the k selected latent rows c_kv and rope keys
  per query ([B, T, k, d_c] / [B, T, k, d_r]), so score and value work is O(T·k) instead of O(T·S). Queries are
  processed in blocks of BLOCK so the gathered rows and the indexer's [B, T, H_I, S] scores stay small; each block
  only looks at the keys some query of the block can see (causal reach), which also halves the indexer's work.
- `SparseMLA` is MLA with an indexer: the same projections, cache and dense forms (dsv3/attention.py), and the
  sparse ones below. Modes (`SparseMLA.dsa_mode`): "sparse" (default), "masked" (dense absorbed scores with everything but the top-k masked:
  the reference the gathered path must equal), "window" (sliding window of the last k tokens, the same budget,
  no indexer: the baseline), "dense" (plain MLA; the indexer only runs when training it), "blocked" (dense MLA in
  its MHA form, keys/values expanded once, SDPA per query block over its causal reach: dense attention whose memory
  stays O(BLOCK·S), the long-context dense baseline of bench/attention.py).
- Training stages (`Indexer.stage`, report §2.1): "warmup" — dense attention, only the indexer learns, by
  KL(p_t ‖ softmax(I_t)) with p_t the main attention probabilities summed over heads and L1-normalised;
  "sparse" — sparse attention, all weights learn from the LM loss, the indexer only from the KL restricted to the
  selected set, its inputs detached. The KL of the last forward is left in `Indexer.last_loss`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLA, Attend
from .config import ModelConfig
from .rope import apply_rope

DSAMode = Literal["sparse", "masked", "window", "dense", "blocked"]
Stage = Literal["warmup", "sparse"]
Precision = Literal["bf16", "fp8"]
BLOCK = 512  # queries per block of the sparse path
FP8_BLOCK = 128  # elements per FP8 scale (V3.2-Exp inference/model.py `block_size`)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _check_hadamard_dim(d: int) -> None:
    if d <= 0 or d & (d - 1):
        raise ValueError(f"the FP8 indexer's Hadamard rotation needs a power-of-two index_head_dim, got "
                         f"index_head_dim={d}")


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh–Hadamard transform of the last dim: x: [..., d] -> H_d·x·d^-½, d a power of two.

    H_d is Sylvester's: H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]; H_d·d^-½ is orthogonal and its own inverse.
    The O(d log d) butterfly: at stride h, each pair (a, b) = (x[i], x[i + h]) of a 2h-block becomes (a + b, a - b).
    The reference's `rotate_activation` = fast_hadamard_transform.hadamard_transform(x, scale=d ** -0.5).
    """
    d = x.shape[-1]
    _check_hadamard_dim(d)
    y, h = x, 1
    while h < d:
        y = y.reshape(*x.shape[:-1], d // (2 * h), 2, h)  # [..., blocks, (a, b), h]
        a, b = y.unbind(-2)
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape) * d ** -0.5


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """x: [..., d] -> x rounded through float8_e4m3fn, dequantised (fp32), one scale per min(128, d)-block.

    The reference's `act_quant` with the V3.2 FP8 config's scale_fmt "ue8m0" (config_671B_v3.2.json): per block
    s = 2^ceil(log2(max(absmax, 1e-4) / 448)), x_fp8 = e4m3(x / s), so |x / s| <= 448 never saturates. Simulated
    FP8: the values are cast to e4m3 and multiplied back by s here, so the scores are plain fp32 matmuls of these
    values, equal to the reference's `fp8_index` (FP8 products, the scales folded in afterwards:
    w·q_scale·d_I^-½ per head, k_scale per key) up to fp32 summation order. Since s is a power of two, the
    dequantised values are exact in bf16/fp32, so the key cache holds exactly the FP8 keys; storing them as
    float8 plus one fp32 scale per block, as the reference does (`k_cache`, `k_scale_cache`), would about halve
    the bf16 indexer cache (128 + 4 bytes per token and block instead of 256).
    Gradients pass straight through (identity), so the indexer can be trained in this precision (the cast's own
    backward would round the gradient to e4m3, unscaled).
    """
    d = x.shape[-1]
    block = min(FP8_BLOCK, d)
    if d % block:
        raise ValueError(f"fp8_round: the last dim {d} is not a multiple of the {block}-element scale block")
    x = x.float()
    xb = x.detach().unflatten(-1, (d // block, block))  # [..., d / block, block]
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))  # [..., d / block, 1], a power of two
    rounded = ((xb / s).to(torch.float8_e4m3fn).float() * s).flatten(-2)
    return x + (rounded - x).detach()  # == rounded exactly: the difference is exact (Sterbenz), so is the sum


class Indexer(nn.Module):
    """The lightning indexer of one layer (names as in the V3.2 checkpoint and transformers)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.d_rope, self.topk = (c.index_n_heads, c.index_head_dim,
                                                               c.qk_rope_head_dim, c.index_topk)
        self.wq_b = nn.Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, c.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(c.index_head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(c.hidden_size, c.index_n_heads, bias=False)
        self.stage: Stage | None = None  # training stage, set by `configure_training`
        self.precision: Precision = "bf16"  # "fp8": Hadamard + FP8 scores, set by `set_indexer_precision`
        self.last_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B, T, D], q_latent: [B, T, q_lora_rank] -> q: [B, T, H_I, d_I], k: [B, T, d_I], w: [B, T, H_I]."""
        B, T, _ = x.shape
        q = self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        r = self.d_rope  # rope first, then the rest (reversed w.r.t. MLA's nope-then-rope)
        q = torch.cat((apply_rope(q[..., :r], cos, sin, False), q[..., r:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :r], cos, sin, False), k[..., r:]), dim=-1)
        if self.precision == "fp8":  # reference: rotate_activation, then act_quant, of q and k
            q, k = fp8_round(hadamard(q)).to(q.dtype), fp8_round(hadamard(k)).to(k.dtype)
        w = self.weights_proj(x).float() * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return q, k, w


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] = Σ_h w[b,t,h]·ReLU(q[b,t,h]·k[b,s]) in fp32. q: [B,T,H_I,d_I], w: [B,T,H_I], k: [B,S,d_I]."""
    dots = torch.einsum("bthd,bsd->bths", q.float(), k.float()).relu_()
    return torch.einsum("bths,bth->bts", dots, w)


def topk_select(scores: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-min(k, S) visible keys per query. scores: [B,T,S], mask: [B,T,S] bool -> idx [B,T,k'], valid [B,T,k'].

    `valid` is False where a query sees fewer than k keys (those slots point at masked keys and must be ignored).
    Ties (common: I = 0 whenever every ReLU is 0) go to the later key, deterministically, so that prefill and
    token-by-token decoding select the same keys: the top-k runs on int64 keys (order-preserving bits of the
    fp32 score) << 32 | key index.
    """
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # same order as the floats
    keys = (order << 32) | torch.arange(scores.shape[-1], device=scores.device)
    keys = keys.masked_fill(~mask, torch.iinfo(torch.int64).min)
    idx = keys.topk(min(k, scores.shape[-1]), dim=-1).indices
    return idx, torch.gather(mask, -1, idx)


def window_select(mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last min(k, S) visible keys of each query (sliding window). mask: [B,T,S] causal prefix masks."""
    last = mask.sum(-1, keepdim=True) - 1  # [B, T, 1]: the query's own slot
    idx = last - torch.arange(min(k, mask.shape[-1]), device=mask.device)
    return idx.clamp(min=0), idx >= 0


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, S, d], idx: [B, T, k] -> x[b, idx[b, t, j]]: [B, T, k, d] (row copies: an embedding lookup)."""
    B, S, d = x.shape
    rows = idx + torch.arange(B, device=idx.device).view(B, 1, 1) * S
    return torch.index_select(x.reshape(B * S, d), 0, rows.flatten()).view(*idx.shape, d)


def sparse_mla(q: torch.Tensor, entries: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, scale: float,
               d_c: int):
    """Absorbed MLA over the gathered entries. q: [B,T,H,d_c+d_r] = [W_UKᵀq_nope ; q_pe], entries: [B,S,d_c+d_r]
    = [c_kv ; k_pe] (one gather for both), idx/valid: [B,T,k] -> (o_lat [B,T,H,d_c], logits [B,T,H,k] fp32)."""
    rows = gather_rows(entries, idx)  # [B, T, k, d_c + d_r]
    logits = torch.matmul(q, rows.transpose(-1, -2)) * scale  # [B, T, H, k]
    logits = logits.float().masked_fill(~valid[:, :, None], float("-inf"))
    probs = logits.softmax(-1).to(q.dtype)
    return torch.matmul(probs, rows[..., :d_c]), logits


def dense_logits(q_lat, q_pe, c_kv, k_pe, mask, scale: float) -> torch.Tensor:
    """Absorbed dense MLA logits [B, T, H, S] fp32, -inf where mask [B, T, S] is False."""
    logits = (torch.einsum("bthc,bsc->bths", q_lat, c_kv) + torch.einsum("bthr,bsr->bths", q_pe, k_pe)) * scale
    return logits.float().masked_fill(~mask[:, :, None], float("-inf"))


def head_summed_probs(logits: torch.Tensor) -> torch.Tensor:
    """Attention probabilities summed over heads and L1-normalised: [B, T, H, S] -> [B, T, S] (report §2.1)."""
    return logits.softmax(-1).mean(2)


def kl_to_indexer(p: torch.Tensor, index_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ_t KL(p_t ‖ softmax(I_t)) over the entries where valid; p, index_logits, valid: [B, T, S or k]."""
    log_q = index_logits.masked_fill(~valid, float("-inf")).log_softmax(-1)
    terms = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p))
    return terms.sum()


def _reach(mask: torch.Tensor) -> int:
    """1 + the last key index any query of this block can see (masks are causal prefixes)."""
    return int(mask.flatten(0, 1).any(0).nonzero()[-1]) + 1


class SparseMLA(MLA):
    """MLA whose queries attend over the entries a lightning indexer picks (V3.2 eq. 1-2): MLA's own projections,
    latent cache and dense forms, plus the indexer and the sparse forms, chosen by `dsa_mode`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.indexer = Indexer(config)
        self.dsa_mode: DSAMode = "sparse"

    def forward(self, x: torch.Tensor, ctx: Attend, layer: int = 0) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D], or [B, keep, D] with ctx.keep > 0: the indexer scores every query, so all T
        attend and the last `keep` rows are kept."""
        q_latent = self.q_a_layernorm(self.q_a_proj(x))  # [B, T, q_lora_rank], read by the indexer too
        q_nope, q_pe = self.query(x, q_latent).split([self.d_nope, self.d_rope], dim=-1)
        q_pe = self.rotate(q_pe, ctx.cos, ctx.sin)
        c_kv, k_pe = self.latent(x, ctx, layer)
        out = self.sparse(x, q_latent, q_nope, q_pe, c_kv, k_pe, ctx, layer)
        if out is None:  # "dense" mode: plain MLA over every visible key
            out = self.attend(q_nope, q_pe, c_kv, k_pe, ctx.mask, replace(ctx, keep=0))
        return self.o_proj((out[:, -ctx.keep:] if ctx.keep else out).flatten(2))

    def sparse(self, x, q_latent, q_nope, q_pe, c_kv, k_pe, ctx: Attend, layer: int) -> torch.Tensor | None:
        """The per-head outputs [B, T, H, d_v] of the current mode, or None for "dense" (plain MLA runs).
        x: [B,T,D]; q_latent: [B,T,q_lora_rank]; c_kv/k_pe: [B,S,·] (cache slots or the T tokens)."""
        ind: Indexer = self.indexer
        stage = ind.stage if torch.is_grad_enabled() else None
        mode = "dense" if stage == "warmup" else self.dsa_mode
        ind.last_loss = None
        if mode == "dense" and stage is None:
            return None
        mask = ctx.mask
        if mode == "blocked":
            return self._blocked_dense(q_nope, q_pe, c_kv, k_pe, mask)
        w_uk, w_uv = self.absorbed_weights(x.dtype)  # [H, d_n, d_c], [H, d_v, d_c]
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # [B, T, H, d_c]
        if mode != "window":
            if stage is not None:  # the indexer learns only from its KL: its inputs carry no gradient to the model
                x, q_latent = x.detach(), q_latent.detach()
            qi, ki, wi = ind(x, q_latent, ctx.cos, ctx.sin)
            if ctx.cache is not None:
                ki = ctx.cache.update_index(layer, ctx.positions, ki, ctx.length).to(qi.dtype)
        if mode in ("sparse", "window"):
            q_cat, entries = torch.cat((q_lat, q_pe), -1), torch.cat((c_kv, k_pe), -1)  # [B,T,H,d_c+d_r], [B,S,·]
        B, T = x.shape[:2]
        outs, kl = [], torch.zeros((), device=x.device)
        for t0 in range(0, T, BLOCK):
            t1 = min(T, t0 + BLOCK)
            hi = _reach(mask[:, t0:t1])
            m = mask[:, t0:t1, :hi]
            args = (q_lat[:, t0:t1], q_pe[:, t0:t1], c_kv[:, :hi], k_pe[:, :hi])
            if mode == "window":
                idx, valid = window_select(m, ind.topk)
            else:
                scores = index_scores(qi[:, t0:t1], wi[:, t0:t1], ki[:, :hi])  # [B, Tb, S_b] fp32
                idx, valid = topk_select(scores.detach(), m, ind.topk)
            if mode == "dense":  # warm-up: target = dense attention over all visible keys
                with torch.no_grad():
                    p = head_summed_probs(dense_logits(*args, m, self.softmax_scale))
                kl = kl + kl_to_indexer(p, scores, m)
                continue
            if mode == "masked":
                chosen = torch.zeros_like(m).scatter_(-1, idx, valid)
                logits = dense_logits(*args, m & chosen, self.softmax_scale)
                o_lat = torch.einsum("bths,bsc->bthc", logits.softmax(-1).to(x.dtype), args[2])
            else:
                o_lat, logits = sparse_mla(q_cat[:, t0:t1], entries, idx, valid, self.softmax_scale,
                                           self.kv_lora_rank)
                if stage == "sparse":
                    p = head_summed_probs(logits.detach())  # [B, Tb, k]
                    kl = kl + kl_to_indexer(p, torch.gather(scores, -1, idx), valid)
            outs.append(torch.einsum("bthc,hvc->bthv", o_lat, w_uv))
        if stage is not None:
            ind.last_loss = kl / (B * T)
        return None if mode == "dense" else torch.cat(outs, dim=1)

    def _blocked_dense(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Dense MLA, MHA mode, one query block at a time: [B, T, H, d_v]."""
        k, v = self.expand_kv(c_kv, k_pe)
        q, k, v = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        outs = []
        for t0 in range(0, q.shape[2], BLOCK):
            t1 = min(q.shape[2], t0 + BLOCK)
            hi = _reach(mask[:, t0:t1])
            outs.append(F.scaled_dot_product_attention(q[:, :, t0:t1], k[:, :, :hi], v[:, :, :hi],
                                                       attn_mask=mask[:, None, t0:t1, :hi], scale=self.softmax_scale))
        return torch.cat(outs, dim=2).transpose(1, 2)


def set_mode(model: nn.Module, mode: DSAMode) -> None:
    """Switch every DSA attention layer of `model` to `mode` ("sparse", "masked", "window", "dense")."""
    if mode not in ("sparse", "masked", "window", "dense", "blocked"):
        raise ValueError(f"dsa mode {mode!r}: expected 'sparse', 'masked', 'window', 'dense' or 'blocked'")
    layers = [m for m in model.modules() if isinstance(m, SparseMLA)]
    if not layers:
        raise ValueError("set_mode: the model has no lightning indexer (config.index_topk is None)")
    for m in layers:
        m.dsa_mode = mode


def set_indexer_precision(model: nn.Module, precision: Precision) -> None:
    """Score every lightning indexer of `model` in `precision`: "bf16" (unquantised, the default, as transformers)
    or "fp8" (Hadamard rotation + FP8 rounding of q^I/k^I, as the V3.2-Exp inference code; see `fp8_round`).
    Rounded keys are what gets cached, so switch before filling a cache, not in the middle of a sequence."""
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"indexer precision {precision!r}: expected 'bf16' or 'fp8'")
    found = indexers(model)
    if not found:
        raise ValueError("set_indexer_precision: the model has no lightning indexer (config.index_topk is None)")
    for ind in found:
        if precision == "fp8":
            _check_hadamard_dim(ind.head_dim)
        ind.precision = precision


def indexers(model: nn.Module) -> list[Indexer]:
    return [m for m in model.modules() if isinstance(m, Indexer)]


def configure_training(model: nn.Module, stage: Stage) -> None:
    """Prepare `model` for a DSA training stage (report §2.1).

    "warmup": dense attention; every parameter but the indexers' is frozen (requires_grad False).
    "sparse": sparse attention; all parameters train (the indexer through its own KL only, see `attend`).
    """
    if stage not in ("warmup", "sparse"):
        raise ValueError(f"DSA stage {stage!r}: expected 'warmup' or 'sparse'")
    found = indexers(model)
    if not found:
        raise ValueError("DSA training needs a model with lightning indexers: config.index_topk is None "
                         "(add them with dsv3.dsa.add_indexers)")
    set_mode(model, "dense" if stage == "warmup" else "sparse")
    index_params = {id(p) for ind in found for p in ind.parameters()}
    for p in model.parameters():
        p.requires_grad_(stage == "sparse" or id(p) in index_params)
    for ind in found:
        ind.stage = stage


def indexer_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over layers of the indexers' KL from the last forward (None when no indexer computed one)."""
    losses = [ind.last_loss for ind in indexers(model) if ind.last_loss is not None]
    return torch.stack(losses).sum() if losses else None


def add_indexers(model: nn.Module, index_n_heads: int, index_head_dim: int, index_topk: int) -> None:
    """Turn a dense model into a DSA one in place: set the config fields and give every MLA (MTP layers too) a
    freshly initialised indexer (N(0, initializer_range) linears, unit LayerNorm), as V3.2-Exp was made from
    V3.1-Terminus by continued training."""
    import dataclasses

    config = dataclasses.replace(model.config, index_n_heads=index_n_heads, index_head_dim=index_head_dim,
                                 index_topk=index_topk)
    model.config = config
    p = next(model.parameters())
    for m in model.modules():
        if isinstance(m, MLA) and not isinstance(m, SparseMLA):  # dsv3.fast.prepare may have subclassed it
            ind = Indexer(config).to(device=p.device, dtype=p.dtype)
            for lin in (ind.wq_b, ind.wk, ind.weights_proj):
                nn.init.normal_(lin.weight, std=config.initializer_range)
            # the layer keeps its weights and becomes the sparse subclass, which only adds the indexer and the mode
            m.__class__ = SparseMLA
            m.indexer, m.dsa_mode = ind, "sparse"
