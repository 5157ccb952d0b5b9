"""The DeepSeek-V3 transformer: embedding, decoder blocks (MLA + dense MLP or DeepSeekMoE), final norm, LM head,
and the multi-token-prediction (MTP) modules.

Module names follow the Hugging Face checkpoints (`model.layers.3.self_attn.kv_b_proj.weight`, ...), so a hub
state dict loads by name. MTP modules live in `mtp.k`; on disk they are `model.layers.{num_hidden_layers + k}`
(dsv3/checkpoint.py maps the two).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .attention import MLA, Attend, AttnImpl
from .cache import KVCache
from .config import ModelConfig
from .dsa import SparseMLA
from .layers import MLP, RMSNorm
from .moe import MoE
from .rope import RotaryEmbedding


class Block(nn.Module):
    """Pre-norm residual block: h += MLA(norm(h)); h += FFN(norm(h)), FFN dense or MoE by layer index."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = SparseMLA(config) if config.uses_dsa else MLA(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: Attend, layer: int = 0) -> torch.Tensor:
        """h: [B, T, D] -> [B, T, D], or [B, keep, D] for ctx.keep > 0: only the last `keep` positions go on past
        the attention's queries. `layer` indexes the cache."""
        a = self.self_attn(self.input_layernorm(h), ctx, layer)
        h = (h[:, -ctx.keep:] if ctx.keep else h) + a
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """The MTP module's own final norm before the (shared) output head; `head` itself is the main lm_head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(Block):
    """MTP module k (paper-V3 §2.2, eq. 21-23): h' = M [RMSNorm(emb(t_{i+k})); RMSNorm(h_i^{k-1})], then a block.

    The concatenation puts the embedding first, as the released weights expect (vLLM and SGLang order; the
    paper writes [h; emb]). Embedding and output head are shared with the main model.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)


class Backbone(nn.Module):
    """Holds the weights under the `model.` prefix, as in HF's DeepseekV3Model."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """DeepSeek-V3-family causal LM.

    >>> model = Transformer(ModelConfig.tiny())
    >>> logits = model(torch.tensor([[1, 2, 3]]))  # [B, T, V]
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        n_main = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(config, n_main + k) for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, initializer_range) for linear and embedding weights, ones for norms, zero router bias (as HF)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif hasattr(module, "e_score_correction_bias"):  # the MoE gate
                nn.init.normal_(module.weight, std=std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
        self.rotary.inv_freq.copy_(RotaryEmbedding(self.config).inv_freq)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor | None, cache: KVCache | None = None, start_pos: int | torch.Tensor = 0,
                *, attn_impl: AttnImpl = "auto", return_hidden: bool = False, logits_to_keep: int = 0,
                attend_length: int | None = None, inputs_embeds: torch.Tensor | None = None):
        """input_ids: [B, T] -> logits [B, T, V] (and the final normed hidden state [B, T, D] if return_hidden).

        inputs_embeds: [B, T, D] in place of embed_tokens(input_ids) (input_ids then None): the prefill of a
        vision-language model, whose image positions hold projected image features (dsv3/vision/model.py).

        start_pos: position of input_ids[:, 0], an int or a LongTensor [B] (one per cache row). With a cache, the
        new tokens' latents are stored at those positions and attention sees everything before them.
        logits_to_keep: if > 0, only the last that many positions get logits ([B, logits_to_keep, V]), as in
        transformers: a prefill that samples one token skips T - 1 rows of the head (V x D each).
        attend_length: with a cache, how many of its slots attention spans (S); by default max(start_pos) + T,
        which reads a tensor start_pos back to the host. cache.max_seq_len gives static shapes for torch.compile
        and CUDA graphs (slots beyond each row's position are masked, as in gpt-fast). It must cover every new
        token's position (checked for an int start_pos; a tensor one is not read back to check).
        """
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 = every position), got {logits_to_keep}")
        keep = 0 if return_hidden else logits_to_keep
        h = self.hidden_states(input_ids, cache, start_pos, attn_impl=attn_impl, attend_length=attend_length,
                               keep=keep, inputs_embeds=inputs_embeds)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return (logits, h) if return_hidden else logits

    def hidden_states(self, input_ids: torch.Tensor | None, cache: KVCache | None = None,
                      start_pos: int | torch.Tensor = 0, *, attn_impl: AttnImpl = "auto",
                      attend_length: int | None = None, keep: int = 0,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, T] -> final normed hidden states [B, T, D].

        keep > 0: only the last `keep` positions' states, [B, keep, D]. The last layer then runs its queries, MLP or
        MoE for those rows alone (its keys, values and cache entries for all T), as llama.cpp does for the
        positions that need no logits: a 1-token prefill skips (T - 1)/T of that layer's attention and FFN.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        ctx = self.attend_context(B, T, h.device, cache, start_pos, attend_length, attn_impl)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            h = layer(h, replace(ctx, keep=keep) if i == last and keep else ctx, i)
        return self.model.norm(h)

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, depth: int = 0,
                   cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """Logits of MTP module `depth` (0-based, predicting k = depth + 2 tokens ahead).

        hidden: [B, T', D] — the main model's normed final hidden states for depth 0, or the previous MTP module's
        output; input_ids: [B, T] with T = T' + 1 (the tokens one step ahead of `hidden` are embedded).
        Returns logits [B, T', V]: position i predicts token i + depth + 2 of the original sequence.
        cache/start_pos: a one-layer latent cache of this module (drafting in dsv3/speculative.py) and the position
        of hidden[:, 0], as for the main model.
        """
        x = self.mtp_hidden(hidden, input_ids, depth, cache, start_pos)
        return self.lm_head(self.mtp[depth].shared_head.norm(x))

    def mtp_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, depth: int = 0,
                   cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """The output h^k of MTP module `depth` (before its shared_head norm): [B, T', D]."""
        mtp = self.mtp[depth]
        emb = self.model.embed_tokens(input_ids[:, 1:hidden.shape[1] + 1])
        x = mtp.eh_proj(torch.cat((mtp.enorm(emb), mtp.hnorm(hidden)), dim=-1))
        B, T = x.shape[:2]
        return mtp(x, self.attend_context(B, T, x.device, cache, start_pos, None,
                                          "naive" if cache is None else "auto"))

    def attend_context(self, B: int, T: int, device, cache: KVCache | None, start_pos,
                       attend_length: int | None = None, attn_impl: AttnImpl = "auto") -> Attend:
        """The attention context of T new tokens per row: positions [B, T], mask [B, T, S] (key j visible to
        query t iff j <= position t), RoPE tables, S (= the cache length attention spans)."""
        steps = torch.arange(T, device=device)
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos.to(device).view(-1, 1) + steps  # [B, T]
            length = attend_length or int(start_pos.max()) + T
        else:
            positions = (start_pos + steps).expand(B, T)
            if attend_length is not None and attend_length < start_pos + T:
                raise ValueError(f"attend_length={attend_length} leaves out the new tokens' own positions "
                                 f"(start_pos={start_pos}, T={T}): expected at least {start_pos + T}")
            length = attend_length or start_pos + T
        if cache is None:
            key_pos = positions[:, None, :]  # keys are the T new tokens themselves
        else:
            key_pos = torch.arange(length, device=device)[None, None, :]
        mask = key_pos <= positions[:, :, None]
        cos, sin = self.rotary(positions)
        return Attend(positions, mask, cos, sin, cache, length, attn_impl)

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, *, activated: bool = False, include_mtp: bool = False) -> int:
        """Parameters of the main model (embedding and head included, as DeepSeek counts them).

        activated=True counts what one token touches: all but the (E - K) routed experts it is not sent to.
        """
        modules = [self.model, self.lm_head] + ([self.mtp] if include_mtp else [])
        total = sum(p.numel() for m in modules for p in m.parameters())
        if activated:
            moe_layers = [l.mlp for l in self.model.layers if isinstance(l.mlp, MoE)]
            moe_layers += [l.mlp for l in self.mtp if include_mtp and isinstance(l.mlp, MoE)]
            for moe in moe_layers:
                per_expert = sum(p.numel() for p in moe.experts[0].parameters())
                total -= (moe.n_experts - moe.top_k) * per_expert
        return total

    def new_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A latent cache for this model on its device, in its dtype unless given."""
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_seq_len, dtype=dtype or p.dtype, device=p.device)
