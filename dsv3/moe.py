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
from .layers import MLP

MoEPath = Literal["auto", "loop", "gather", "grouped"]
RoutedPath = Literal["loop", "pairs", "gather", "grouped"]

# The routed path `MoE.routed` takes under "auto" in eager mode, by (device is a CPU, torch._grouped_mm runs for
# this dtype and device, N·K <= MoE.cpu_few_pairs on a CPU, MoE.few_pairs on a GPU); measured in
# docs/performance.md §B6:
# - CPU (2 cores, bundled model, K = 4): reading expert ids on the host is free there, so the copy-free pairs for a
#   few pairs, grouped above (2-core AVX2 EPYC, fp32, us: 581 against 795 for grouped at N = 1, 870 against 899 at
#   N = 2, 1859 against 1282 at N = 4; 552 us for grouped at N = 32 against 2545 for the loop on a 2-core Xeon, where
#   pairs lost at N = 1 before they summed the K outputs in one matmul); without _grouped_mm the loop above.
# - GPU (H200, V2-Lite-shaped layer, bf16): gathered weights up to 16 pairs (195 against 341 us at N = 1), grouped
#   above (650 against 371 us at N = 8); no path there reads a tensor back to the host except the loop.
# Training (gradients must reach the expert modules) takes the loop whatever the table says. Experts without stacks
# (LoRA; quantized ones on a CPU, which keep their fused kernels) take `routed_pairs` through the expert modules for
# a few pairs on a CPU (int4 bundled-model layer at N = 1: 453 against 763 us for the loop), else the loop; quantized
# experts on a GPU have a table of their own (dsv3/quant/experts.py). Compiled graphs choose from dsv3/fast/moe.py's
# table instead.
AUTO_PATHS: dict[tuple[bool, bool, bool], RoutedPath] = {
    # (cpu,  grouped, few)
    (True, True, True): "pairs", (True, True, False): "grouped",
    (True, False, True): "pairs", (True, False, False): "loop",
    (False, True, True): "gather", (False, True, False): "grouped",
    (False, False, True): "gather", (False, False, False): "loop",
}


def grouped_mm_runs(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs on CPU (fp32/bf16, torch 2.13) and on CUDA for bf16 on sm90+ only."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


class ExpertStacks:
    """Every routed expert's weights as two stacks, gate_up [E, 2I, D] and down [E, D, I], for the gathered, grouped
    and pairs paths; the one owner of them.

    Built on first use; afterwards each expert's weights are *views* into these stacks, so in-place updates
    (optimizer steps, load_state_dict copies, LoRA merges) reach both at no extra memory. `get` rebuilds them when
    a module or a weight was replaced (quantize, LoRA: identity check; .to/.half: pointer check on the first and
    last expert); the MoE drops them (`drop`) when its parameters are about to be replaced (`_apply`,
    load_state_dict)."""

    auto_paths = AUTO_PATHS  # what `MoE.path = "auto"` runs with these stacks

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.linears: tuple[nn.Linear, ...] = ()

    def get(self, experts: nn.ModuleList, few_on_cpu: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up, down), or None where the fast paths must not run: an expert linear is not a plain nn.Linear,
        or gradients must reach the expert modules. few_on_cpu: "auto" routes a few pairs on a CPU (quantized
        stacks may leave those to the expert modules)."""
        linears = self.expert_linears(experts)
        if linears is None or (torch.is_grad_enabled() and linears[0].weight.requires_grad):
            return None
        stacks = self.tensors
        if (stacks is None or linears != self.linears or linears[0].weight.data_ptr() != stacks[0].data_ptr()
                or linears[-1].weight.data_ptr() != stacks[1][-1].data_ptr()):
            self.drop()  # free the old stacks before allocating new ones
            self.tensors, self.linears = self.build(linears), linears
        return self.tensors

    def drop(self) -> None:
        self.tensors = None

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, D], down [E, D, I]) as tensors, for the grouped matmuls: the stacks themselves."""
        return self.tensors

    @staticmethod
    def expert_linears(experts: nn.ModuleList) -> tuple[nn.Linear, ...] | None:
        """(gate_proj, up_proj, down_proj) of every expert in order, or None if any is not a plain nn.Linear."""
        out = []
        for expert in experts._modules.values():
            for linear in expert._modules.values():
                if type(linear) is not nn.Linear:
                    return None
                out.append(linear)
        return tuple(out)

    @staticmethod
    @torch.inference_mode(False)  # the parameters become views of these: they must stay usable by autograd
    @torch.no_grad()
    def build(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        gates, ups, downs = linears[0::3], linears[1::3], linears[2::3]
        inter = gates[0].weight.shape[0]
        gate_up = torch.stack([torch.cat((g.weight, u.weight)) for g, u in zip(gates, ups)])
        down = torch.stack([d.weight for d in downs])
        for i, (g, u, d) in enumerate(zip(gates, ups, downs)):
            g.weight.data, u.weight.data, d.weight.data = gate_up[i, :inter], gate_up[i, inter:], down[i]
        return gate_up, down


def _drop_stacks(moe: "MoE", _incompatible_keys) -> None:
    """After load_state_dict: the weights may be new tensors."""
    moe.stacks.drop()


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
                group_scores = grouped.gather(-1, self.top_indices(grouped, 2)).sum(dim=-1)  # [N, G]
            else:
                group_scores = grouped.amax(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, self.top_indices(group_scores, self.topk_group), True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        indices = self.top_indices(choice, self.top_k)  # [N, K] (any order: the K outputs are summed)
        weights = s.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # eps: all-underflow guard (HF)
        return weights * self.route_scale, indices, s

    def top_indices(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Indices [..., k] of the k largest of scores [..., E], in any order (the K outputs are summed)."""
        return scores.topk(k, dim=-1, sorted=False).indices

    def route_on_host(self, x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """`forward`'s routing of a few tokens x: [N, D] worked out in Python: (weights [N, K] float32, the K expert
        ids of each token). For decoding on a CPU, where `forward`'s ~15 small tensor ops cost ~10 µs each and
        reading N·E affinities to the host costs nothing (MoE.forward, docs/results.md: ~5% of an eager step).
        The same choices and weights as `forward` up to float32 rounding: sums and the normalisation are taken in
        double precision, so a near-tie within float32 rounding may go the other way."""
        rows = self.scores(x).tolist()  # s: [N][E]
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias.tolist()
        n_experts = len(rows[0])
        size = n_experts // self.n_group
        weights, chosen = [], []
        for s in rows:
            choice = s if bias is None else [a + b for a, b in zip(s, bias)]
            candidates = range(n_experts)
            if self.topk_method != "greedy" and self.n_group > 1:  # keep the best topk_group groups
                groups = [choice[g * size:(g + 1) * size] for g in range(self.n_group)]
                score = [sum(sorted(grp)[-2:]) if self.topk_method == "noaux_tc" else max(grp) for grp in groups]
                kept = sorted(range(self.n_group), key=score.__getitem__, reverse=True)[:self.topk_group]
                candidates = [g * size + j for g in kept for j in range(size)]
            top = sorted(candidates, key=choice.__getitem__, reverse=True)[:self.top_k]
            w = [s[e] for e in top]  # the unbiased affinities
            if self.norm_topk_prob:
                total = sum(w) + 1e-20
                w = [v / total for v in w]
            weights.append([v * self.route_scale for v in w])
            chosen.append(top)
        return torch.tensor(weights, dtype=torch.float32, device=x.device), chosen


class MoE(nn.Module):
    """y = Σ_shared FFN(x) + Σ_k g_k FFN_{i_k}(x) (eq. 12). Experts are stored one module each, as the hub does.

    `path` picks how the routed experts run ("auto", "loop", "gather", "grouped"; see `routed`), all equal to
    `routed_reference`. docs/performance.md §B6 describes the strategies and their measured crossovers.

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
        self.path: MoEPath = "auto"
        self.few_pairs = 16  # N·K up to this is "few" in AUTO_PATHS on a GPU, and for unstacked experts on a CPU
        self.cpu_few_pairs = 8  # ... and for stacked experts on a CPU: pairs win at one token, tie at two (K = 4)
        # the routed experts' stacked weights; dsv3.quant installs its own kind for quantized experts
        self.stacks = ExpertStacks()
        self.register_load_state_dict_post_hook(_drop_stacks)

    @property
    def impl(self) -> MoEPath:
        """The former name of `path`."""
        return self.path

    @impl.setter
    def impl(self, path: MoEPath) -> None:
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        stacks = self.pairs_on_host(flat)
        if stacks is not None:  # a few tokens on a CPU: the router in Python, then the pairs path
            weights, experts = self.gate.route_on_host(flat)
            y = self.routed_pairs(flat, weights, experts, *stacks)
        else:
            weights, indices, s = self.gate(flat)
            y = self.routed(flat, weights, indices, decode_step=T == 1)
            if self.training:
                self._record_balance(s.view(B, T, -1), indices.view(B, T, -1))
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, D)

    def pairs_on_host(self, x: torch.Tensor) -> tuple | None:
        """Where `routed` would take the pairs path for x: [N, D] on a CPU (no gradient, not training): the stacks it
        takes ((gate_up, down), or () for the expert modules), so that the router can run on the host too; else None.
        (Compiled graphs route with tensors: dsv3/fast/moe.py.)"""
        pairs = x.shape[0] * self.top_k
        if (not x.is_cpu or self.training or torch.is_grad_enabled() or self.path not in ("auto", "pairs")
                or (self.path == "auto" and pairs > max(self.few_pairs, self.cpu_few_pairs))):  # never "few" then
            return None
        path, stacks = self.plan(x, pairs, decode_step=False)
        return stacks if path == "pairs" else None

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *,
               decode_step: bool = False) -> torch.Tensor:
        """x: [N, D], weights/indices: [N, K] -> Σ_k w_k FFN_{i_k}(x): [N, D], by `self.path`, or under "auto"
        by AUTO_PATHS. decode_step: the N rows are one new token per sequence (T = 1), not prompt tokens (eager
        paths do not need to know; compiled graphs choose by it, dsv3/fast/moe.py)."""
        path, stacks = self.plan(x, indices.numel(), decode_step)
        if path == "grouped":
            return self.routed_grouped(x, weights, indices, *self.stacks.dense(x.dtype))
        if path == "gather":
            return self.routed_gather(x, weights, indices, *stacks)
        if path == "pairs":
            return self.routed_pairs(x, weights, indices, *stacks)
        return self.routed_loop(x, weights, indices)

    def plan(self, x: torch.Tensor, pairs: int, decode_step: bool) -> tuple[RoutedPath, tuple]:
        """The path `routed` runs for x: [N, D] and N·K = `pairs`, and the stacks it runs on (() for the expert
        modules: training, or experts that do not stack here, as quantized ones on a CPU keep their kernels)."""
        few_on_cpu = self.path == "auto" and x.is_cpu and pairs <= self.few_pairs
        stacks = None if self.path == "loop" else self.stacks.get(self.experts, few_on_cpu)
        if stacks is None:
            if self.path not in ("auto", "loop", "pairs"):
                raise ValueError(f"MoE.path={self.path!r} needs stacked experts (plain nn.Linear, or quantized ones on a "
                                 "GPU) and no gradient to them")
            few = self.path == "pairs" or (self.path == "auto" and x.is_cpu and not torch.is_grad_enabled()
                                           and pairs <= self.few_pairs)
            return ("pairs" if few else "loop"), ()
        return self.choose_path(x, pairs, decode_step), stacks

    def choose_path(self, x: torch.Tensor, pairs: int, decode_step: bool) -> RoutedPath:
        """`self.path`, checked, or the AUTO_PATHS entry for N·K = `pairs` (decode_step: unused in eager)."""
        grouped = grouped_mm_runs(x)
        if self.path == "grouped" and not grouped:
            raise ValueError(f"MoE.path='grouped': torch._grouped_mm is unavailable for {x.dtype} on {x.device}")
        if self.path != "auto":
            return self.path
        cpu = x.device.type == "cpu"
        return self.stacks.auto_paths[cpu, grouped, pairs <= (self.cpu_few_pairs if cpu else self.few_pairs)]

    def routed_loop(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sort the N·K (token, expert) pairs by expert, one module call per used expert (gradients flow to the
        expert modules; `.tolist()` of the counts is a host sync, which is why decoding avoids this path)."""
        order = indices.flatten().argsort()  # pairs sorted by expert
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts).tolist()
        token = order // indices.shape[1]  # which token each sorted pair belongs to
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

    def routed_pairs(self, x, weights, indices, gate_up=None, down=None) -> torch.Tensor:
        """A few tokens on CPU (decoding, speculative verification): read the N·K expert ids on the host (free
        without a device) and multiply each token by views of its experts' stacks (gate_up [E, 2I, D], down
        [E, D, I]), copying no weights; without stacks, by the experts' own gate/up/down layers (quantized experts
        on a CPU, whose fused low-bit kernels take the row: ~40% less time than the loop's sort and scatter at N = 1).
        Those are called through their `forward`, skipping nn.Module's call machinery (~3 µs a call, 48 calls a
        token on the bundled model; int8/int4 decode -3.5%), as the stacked paths never call the expert modules at
        all: hooks on the experts run in the loop path only.
        indices: [N, K] ids, or the lists of them `Gate.route_on_host` gives.

        Each op costs ~8 µs in an eager CPU decode step whatever its size, so a token's K experts share ops where
        they can: their gate/up rows side by side take one SiLU and one product, and one [1, K] @ [K, D] matmul
        weighs and sums their outputs (docs/results.md)."""
        rows, weights = [], weights.to(x.dtype)
        for t, experts in enumerate(indices if isinstance(indices, list) else indices.tolist()):
            xt = x[t:t + 1]
            if gate_up is None:  # the experts' own layers (quantized on a CPU: their fused kernels take the row)
                mlps = [self.experts[e]._modules for e in experts]
                gate = torch.cat([m["gate_proj"].forward(xt) for m in mlps])
                up = torch.cat([m["up_proj"].forward(xt) for m in mlps])
                hidden = (F.silu(gate) * up).split_with_sizes([1] * len(mlps))  # K rows [1, I]
                ys = torch.cat([m["down_proj"].forward(h) for m, h in zip(mlps, hidden)])  # [K, D]
            else:
                gate, up = torch.cat([F.linear(xt, gate_up[e]) for e in experts]).chunk(2, dim=-1)  # [K, I] each
                hidden = (F.silu(gate) * up).unbind(0)  # K rows [I]
                ys = torch.stack([F.linear(h, down[e]) for h, e in zip(hidden, experts)])  # [K, D]
            rows.append(weights[t:t + 1] @ ys)  # [1, K] @ [K, D]: the weighted sum in one op
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def routed_gather(self, x, weights, indices, gate_up, down) -> torch.Tensor:
        """Decode path (gpt-fast Mixtral, HF batched_mm): gather the K chosen experts' weights per token and
        multiply. gate_up: [E, 2I, D], down: [E, D, I]. Reads only the selected experts; static shapes; eager
        indexing copies the chosen weights out ([N·K, 2I, D]) before each bmm."""
        N, K = indices.shape
        flat = indices.flatten()  # [N·K]
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
        K (index_add_'s atomic scatter took 200 us there). On CPU both are slower (docs/results.md): int64 keys
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
        h = self.grouped_mm(x.index_select(0, token), gate_up.transpose(-2, -1), offs)  # [N·K, 2I]
        gate, up = h.chunk(2, dim=-1)
        # the routing weight scales the I-wide hidden before the (linear) down projection, not its D-wide output
        h = F.silu(gate) * up * weights.flatten()[order, None].to(x.dtype)
        y = self.grouped_mm(h, down.transpose(-2, -1), offs)  # [N·K, D], rows in expert order
        if not gather_back:
            return torch.zeros_like(x).index_add_(0, token, y)
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=x.device))
        return y.index_select(0, inverse).view(N, K, -1).sum(dim=1)  # [N, D]

    def grouped_mm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """a [M, K] times each group's b [G, K, N]: row block g of a (rows offs[g-1]..offs[g]) by b[g] -> [M, N]."""
        return torch._grouped_mm(a, b, offs=offs)

    def _apply(self, fn, recurse: bool = True):
        self.stacks.drop()  # parameters are about to be replaced (.to, .cuda, .half, ...)
        return super()._apply(fn, recurse)

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
