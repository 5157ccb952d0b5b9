"""DeepSeekMoE: router (paper-V3 §2.1.2 eqs. 12-16), shared + routed SwiGLU experts.

Shapes: N tokens (B·T flattened), D hidden, E routed experts, K experts per token, G groups.
Facts: docs/architecture.md §3. Routing per `topk_method`:
- noaux_tc (V3): s = sigmoid(x·Wᵀ); the correction bias b is added for *selection only*; a group scores the sum
  of its top-2 biased affinities; the best `topk_group` groups are kept (others masked with -inf, as the official
  code since commit 1398800); top-K experts; weights are the *unbiased* s of the chosen experts, normalised when
  `norm_topk_prob`, times `routed_scaling_factor`.
- greedy (V2-Lite): softmax affinities, plain top-K.  group_limited_greedy (V2): a group scores its max affinity.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP, stored

MoEImpl = Literal["auto", "loop", "gather", "grouped"]


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs on CPU (fp32/bf16, torch 2.13; compiled graphs call it through `_cpu_grouped_mm`)
    and on CUDA for bf16 on sm90+ only."""
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


@torch.library.custom_op("dsv3::cpu_grouped_mm", mutates_args=())
def _cpu_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a [M, K], b [G, K, N], offs [G]) -> [M, N], opaque to torch.compile: its shape function
    rejects fp32 (torch 2.13), so a compiled CPU graph calls the eager kernel like any library matmul, without a
    graph break (a compiled 256-token prefill of the bundled model: -22% against eager, bench/RESULTS.md)."""
    return torch._grouped_mm(a, b, offs=offs)


@_cpu_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if a.is_cpu and torch.compiler.is_compiling():
        return _cpu_grouped_mm(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


def stack_experts(model: nn.Module) -> None:
    """Build every MoE's expert weight stacks now, in eager mode: compiled graphs read them (`_stacked_weights`)
    but cannot build them, and without them take the per-expert loop, which breaks the graph at every layer."""
    for module in model.modules():
        if isinstance(module, MoE):
            module._stacked_weights()


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest of scores [..., E], in any order: torch.topk, or inside a compiled graph
    k rounds of argmax-and-mask. Inductor has no lowering for topk, so in a compiled decode step it is a library
    kernel of its own (gatherTopK: 4.8-6.1 us per layer on an H200, for 64 scores, bench/RESULTS.md); argmax rounds
    are reductions inductor generates itself, next to the sigmoid/softmax before them. Equal scores may pick
    different experts than torch.topk does (neither order is specified); distinct ones give the same set."""
    if not torch.compiler.is_compiling():
        return scores.topk(k, dim=-1, sorted=False).indices
    ids = torch.arange(scores.shape[-1], device=scores.device)
    picked = []
    for _ in range(k):
        best = scores.argmax(dim=-1, keepdim=True)
        picked.append(best)
        scores = scores.masked_fill(ids == best, float("-inf"))
    return torch.cat(picked, dim=-1)


class Gate(nn.Module):
    """Router. weight: [E, D]; e_score_correction_bias: [E] float32 buffer (moved by balancing, not by gradients)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scoring_func, self.topk_method = config.scoring_func, config.topk_method
        self.norm_topk_prob, self.route_scale = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s: [N, E] in float32 (router logits in fp32, as transformers and V3.2 compute them)."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, D] -> weights [N, K] float32, indices [N, K] int64, affinities s [N, E] float32."""
        s = self.scores(x)
        choice = s if self.e_score_correction_bias is None else s + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(choice.shape[0], self.n_group, -1)  # [N, G, E/G]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.gather(-1, top_indices(grouped, 2)).sum(dim=-1)  # [N, G]
            else:
                group_scores = grouped.amax(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, top_indices(group_scores, self.topk_group), True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        indices = top_indices(choice, self.top_k)  # [N, K] (any order: the K outputs are summed)
        weights = s.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # eps: all-underflow guard (HF)
        return weights * self.route_scale, indices, s


class MoE(nn.Module):
    """y = Σ_shared FFN(x) + Σ_k g_k FFN_{i_k}(x) (eq. 12). Experts are stored one module each, as the hub does.

    `impl` picks the routed-expert path ("auto", "loop", "gather", "grouped"; see `routed`), all equal to
    `routed_reference`. docs/performance.md §B6 describes the strategies.

    In training mode the forward leaves two things for the trainer (paper-V3 §2.1.2):
    `last_load` [E] — tokens routed to each expert in this batch (for the bias update), and
    `last_balance_loss` — the sequence-wise balance loss Σ_i f_i P_i averaged over sequences (eqs. 17-20), unscaled.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.gate = Gate(config)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.n_routed_experts))
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)
        self.last_load: torch.Tensor | None = None
        self.last_balance_loss: torch.Tensor | None = None
        self.impl: MoEImpl = "auto"
        self.gather_max_pairs = 16  # N·K up to this uses routed_gather under "auto" on a GPU (decoding, few rows)
        self._stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stacked_linears: tuple[nn.Linear, ...] = ()
        self.register_load_state_dict_post_hook(self._drop_stacks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, s = self.gate(flat)
        y = self.routed(flat, weights, indices, decode_step=T == 1)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:
            self._record_balance(s.view(B, T, -1), indices.view(B, T, -1))
        return y.view(B, T, D)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *,
               decode_step: bool = False) -> torch.Tensor:
        """x: [N, D], weights/indices: [N, K] -> Σ_k w_k FFN_{i_k}(x): [N, D], by the path `self.impl` picks.
        decode_step: the N rows are one new token per sequence (T = 1), not prompt tokens.

        "auto" (measured choices, bench/RESULTS.md): the per-expert loop when gradients must reach the expert
        modules (training) or the experts are not plain nn.Linear (quantized, LoRA). Otherwise:
        - eager CPU: grouped matmuls at every N (no weight copies: 0.2 ms at N = 1 and 0.36 ms at N = 8 against
          0.2 / 2.0 ms for the best per-expert path, bundled model, one core); without _grouped_mm, `routed_pairs`
          (N·K <= 16) or the loop.
        - GPU and compiled GPU graphs: gathered weights for N·K <= `gather_max_pairs` (decoding), else grouped
          matmuls (H200, one V2-Lite layer, eager: 195 vs 341 us at N = 1, 650 vs 371 us at N = 8). Compiled, the
          gather is fused into its reductions (no copies).
        - compiled CPU graphs: the fused gather for decode steps at every batch size (one graph for all: reading
          N·K would split it), grouped matmuls for prompts (through `_cpu_grouped_mm`).
        None of the GPU paths reads a tensor back to the host.
        """
        impl = self.impl
        stacked = None if impl == "loop" else self._stacked_weights()
        if stacked is None:
            if impl not in ("auto", "loop"):
                raise ValueError(f"MoE.impl={impl!r} needs plain nn.Linear experts and no gradient to them")
            return self.routed_loop(x, weights, indices)
        grouped_ok = hasattr(torch, "_grouped_mm") and _grouped_mm_ok(x)
        if impl == "grouped" and not grouped_ok:
            raise ValueError(f"MoE.impl='grouped': torch._grouped_mm is unavailable for {x.dtype} on {x.device}")
        if impl == "auto":
            few = indices.numel() <= self.gather_max_pairs  # under torch.compile: a guard, once it is read
            if not torch.compiler.is_compiling():
                if x.device.type == "cpu":
                    # no device to sync with: reading expert ids on the host is free, so the copy-free paths
                    impl = "grouped" if grouped_ok else "pairs" if indices.numel() <= 16 else "loop"
                else:
                    impl = "gather" if few else "grouped" if grouped_ok else "loop"
            elif x.device.type == "cpu":
                impl = "gather" if decode_step or not grouped_ok else "grouped"
            else:  # read `few` only where it decides something, so as not to split the graph by batch size
                impl = "grouped" if grouped_ok and not few else "gather"
        if impl == "grouped":
            return self.routed_grouped(x, weights, indices, *stacked)
        if impl == "gather":
            return self.routed_gather(x, weights, indices, *stacked)
        if impl == "pairs":
            return self.routed_pairs(x, weights, indices, *stacked)
        return self.routed_loop(x, weights, indices)

    def routed_loop(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sort the N·K (token, expert) pairs by expert, one module call per used expert (gradients flow to the
        expert modules; `.tolist()` of the counts is a host sync, which is why decoding avoids this path)."""
        if torch.compiler.is_compiling():
            # inside a compiled graph (quantized or LoRA experts: no stacks) `.tolist()` would split the graph and
            # recompile per expert pattern: every expert runs on every row instead, weighted 0 where not chosen —
            # E/K times the expert work, until such experts have a gathered path of their own
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                out = out + expert(x) * (weights * (indices == e)).sum(-1, keepdim=True).to(x.dtype)
            return out
        order = indices.flatten().argsort()  # pairs sorted by expert
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts).tolist()
        token = order // self.top_k  # which token each sorted pair belongs to
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = token[start:start + n]
            w = weights.flatten()[order[start:start + n]]
            out.index_add_(0, idx, self.experts[e](x.index_select(0, idx)) * w[:, None].to(x.dtype))
            start += n
        return out

    def routed_pairs(self, x, weights, indices, gate_up, down) -> torch.Tensor:
        """A few tokens on CPU (decoding, speculative verification): read the N·K expert ids on the host (free
        without a device) and multiply each token by views of its experts' stacks, copying no weights."""
        rows = []
        for t, experts in enumerate(indices.tolist()):
            xt, out = x[t:t + 1], None
            for k, e in enumerate(experts):
                gate, up = F.linear(xt, gate_up[e]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, down[e]) * weights[t:t + 1, k:k + 1].to(x.dtype)
                out = y if out is None else out + y
            rows.append(out)
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def routed_gather(self, x, weights, indices, gate_up, down) -> torch.Tensor:
        """Decode path (gpt-fast Mixtral, HF batched_mm): gather the K chosen experts' weights per token and
        multiply. gate_up: [E, 2I, D], down: [E, D, I]. Reads only the selected experts; static shapes.
        Eager: copies of the weights and bmm; compiled: the same products as multiply-and-sum (fp32), which
        inductor fuses with the gather."""
        N, K = indices.shape
        flat = indices.flatten()  # [N·K]
        if torch.compiler.is_compiling():
            # as one multiply-and-sum, inductor fuses the gather into the reduction: each chosen expert's weights
            # are read once, in place, where bmm would first copy them out ([N·K, 2I, D] written and read again)
            w = gate_up[flat].view(N, K, *gate_up.shape[1:]).float()  # [N, K, 2I, D]
            I, xs = down.shape[-1], x.float()[:, None, None, :]
            # gate and up as two reductions over the same [N, K, I] rows (inductor runs them in one loop), so that
            # the hidden (rounded where bmm's input is) has their shape and is stored as they finish (`stored`)
            gate, up = (w[:, :, :I] * xs).sum(-1), (w[:, :, I:] * xs).sum(-1)  # [N, K, I] each
            h = stored((F.silu(gate) * up).to(x.dtype)).float()
            y = (down[flat].view(N, K, *down.shape[1:]).float() * h[:, :, None, :]).sum(-1).to(x.dtype)  # [N, K, D]
            return (y * weights[:, :, None].to(x.dtype)).sum(dim=1)
        xs = x[:, None].expand(N, K, x.shape[1]).reshape(N * K, -1, 1)  # [N·K, D, 1]
        gate, up = torch.bmm(gate_up[flat], xs).squeeze(-1).chunk(2, dim=-1)  # [N·K, I] each
        y = torch.bmm(down[flat], (F.silu(gate) * up)[:, :, None]).squeeze(-1)  # [N·K, D]
        return (y.view(N, K, -1) * weights[:, :, None].to(x.dtype)).sum(dim=1)

    def routed_grouped(self, x, weights, indices, gate_up, down, *, gather_back: bool | None = None) -> torch.Tensor:
        """Prefill path (HF grouped_mm_experts_forward, torchtitan GroupedExperts): sort pairs by expert, one
        grouped matmul over all experts for gate/up and one for down; each touched expert is read once.
        Counts come from scatter_add (not bincount, whose output size needs the max on the host).

        gather_back (default: on CUDA) sorts 8-bit expert ids (one radix pass, not eight: 65 -> ~10 us per
        2048-token layer on an H200) and brings the output rows back to token order by a row gather and a sum over
        K (index_add_'s atomic scatter took 200 us there). On CPU both are slower (bench/RESULTS.md): int64 keys
        and index_add_."""
        N, K = indices.shape
        flat = indices.flatten()
        if gather_back is None:
            gather_back = x.is_cuda
        narrow = torch.uint8 if self.n_experts <= 256 else torch.int32
        order = (flat.to(narrow) if gather_back else flat).argsort(stable=True)  # [N·K] pairs, grouped by expert
        counts = torch.zeros(self.n_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)  # end row of each expert's group
        token = order // K
        # index_select, not x[token]: the same rows, ~5x faster on CPU for this dim-0 gather
        h = _grouped_mm(x.index_select(0, token), gate_up.transpose(-2, -1), offs)  # [N·K, 2I]
        gate, up = h.chunk(2, dim=-1)
        # the routing weight scales the I-wide hidden before the (linear) down projection, not its D-wide output
        h = F.silu(gate) * up * weights.flatten()[order, None].to(x.dtype)
        y = _grouped_mm(h, down.transpose(-2, -1), offs)  # [N·K, D], rows in expert order
        if not gather_back:
            return torch.zeros_like(x).index_add_(0, token, y)
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=x.device))
        return y.index_select(0, inverse).view(N, K, -1).sum(dim=1)  # [N, D]

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up [E, 2I, D], down [E, D, I]) for the fast paths, or None where they must not run.

        Built once; afterwards each expert's weights are *views* into these stacks, so in-place updates (optimizer
        steps, load_state_dict copies, LoRA merges) reach both at no extra memory. Whatever replaces a weight or a
        module drops the stacks: `_apply` (.to/.cuda/.half), load_state_dict (post hook), a replaced expert
        linear (quantize, LoRA: identity check) or parameter (pointer check on the first and last expert).
        """
        if torch.compiler.is_compiling():  # no checks inside a compiled graph (the eager warm-up built the stacks)
            return None if torch.is_grad_enabled() else self._stacks
        linears = self._expert_linears()
        if linears is None:
            return None
        if torch.is_grad_enabled() and linears[0].weight.requires_grad:
            return None  # gradients must reach the expert modules: the loop calls them
        stacks = self._stacks
        if (stacks is None or linears != self._stacked_linears
                or linears[0].weight.data_ptr() != stacks[0].data_ptr()
                or linears[-1].weight.data_ptr() != stacks[1][-1].data_ptr()):
            self._stacks, self._stacked_linears = self._build_stacks(linears), linears
        return self._stacks

    def _expert_linears(self) -> tuple[nn.Linear, ...] | None:
        """(gate_proj, up_proj, down_proj) of every expert in order, or None if any is not a plain nn.Linear."""
        out = []
        for expert in self.experts._modules.values():
            for linear in expert._modules.values():
                if type(linear) is not nn.Linear:
                    return None
                out.append(linear)
        return tuple(out)

    @torch.inference_mode(False)  # the parameters become views of these: they must stay usable by autograd
    @torch.no_grad()
    def _build_stacks(self, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        gates, ups, downs = linears[0::3], linears[1::3], linears[2::3]
        inter = gates[0].weight.shape[0]
        self._stacks = None  # free the old stacks before allocating new ones
        gate_up = torch.stack([torch.cat((g.weight, u.weight)) for g, u in zip(gates, ups)])
        down = torch.stack([d.weight for d in downs])
        for i, (g, u, d) in enumerate(zip(gates, ups, downs)):
            g.weight.data, u.weight.data, d.weight.data = gate_up[i, :inter], gate_up[i, inter:], down[i]
        return gate_up, down

    def _apply(self, fn, recurse: bool = True):
        self._stacks = None  # parameters are about to be replaced (.to, .cuda, .half, ...)
        return super()._apply(fn, recurse)

    def _drop_stacks(self, *_) -> None:
        self._stacks = None

    def routed_reference(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Plain per-token loop over its K experts; the definition `routed` must agree with."""
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(indices.shape[1]):
                out[t] += weights[t, k].to(x.dtype) * self.experts[int(indices[t, k])](x[t])
        return out

    def _record_balance(self, s: torch.Tensor, indices: torch.Tensor) -> None:
        """s: [B, T, E] affinities, indices: [B, T, K]. f_i = E/(K·T) Σ_t 1[i chosen], P_i = mean_t s'_i."""
        B, T, E = s.shape
        chosen = torch.zeros(B, T, E, device=s.device).scatter_(2, indices, 1.0)
        self.last_load = chosen.sum(dim=(0, 1)).detach()
        f = chosen.sum(dim=1) * E / (self.top_k * T)  # [B, E], no gradient (an indicator)
        p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
        self.last_balance_loss = (f * p).sum(dim=-1).mean()
