"""The MoE inside compiled graphs: its path table there and the formulations inductor compiles well.

Each formulation is a function computing what its eager counterpart in dsv3/moe.py computes (tests/test_fast.py
checks each against it on random inputs, in eager):
- `argmax_top_indices` ~ torch.topk: k rounds of argmax-and-mask. Inductor has no lowering for topk, so in a
  compiled decode step it is a library kernel of its own (gatherTopK: 4.8-6.1 us per layer on an H200, for 64
  scores, docs/results.md); argmax rounds are reductions inductor generates itself, next to the sigmoid/softmax
  before them. Equal scores may pick other experts than torch.topk does (neither order is specified); distinct
  ones give the same set.
- `fused_gather` ~ `MoE.routed_gather`: the gathered experts' products as multiply-and-sum, which inductor fuses
  with the gather, so each chosen expert's weights are read once in place instead of copied out for bmm.
- `every_expert` ~ `MoE.routed_loop`: for experts without stacks (quantized, LoRA, or with gradients), every expert
  on every row, weighted 0 where not chosen: E/K times the expert work, but no `.tolist()`, which would split the
  graph and recompile per expert pattern.
- `cpu_grouped_mm` ~ torch._grouped_mm, opaque to the compiler (its shape function rejects fp32, torch 2.13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..moe import RoutedPath, grouped_mm_runs
from .layers import stored

# The routed path inside a compiled graph, by (device is a CPU, torch._grouped_mm runs, small): on a CPU small is
# "a decode step" (one graph for every batch size: reading N·K would split it), on a GPU "N·K <= MoE.few_pairs",
# read only where grouped matmuls run, since each read is a guard. The fused gather reads no weight copies, so it
# serves decode steps at every batch size on a CPU; prompts take grouped matmuls (a compiled 256-token prefill of
# the bundled model: -22% against eager); a GPU keeps the eager crossover (docs/performance.md §B6).
COMPILED_PATHS: dict[tuple[bool, bool, bool], RoutedPath] = {
    # (cpu,  grouped, small)
    (True, True, True): "gather", (True, True, False): "grouped",
    (True, False, True): "gather", (True, False, False): "gather",
    (False, True, True): "gather", (False, True, False): "grouped",
    (False, False, False): "gather",
}


@torch.library.custom_op("dsv3::cpu_grouped_mm", mutates_args=())
def cpu_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a [M, K], b [G, K, N], offs [G]) -> [M, N], which a compiled CPU graph calls as the eager
    kernel, like any library matmul, without a graph break."""
    return torch._grouped_mm(a, b, offs=offs)


@cpu_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


def argmax_top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest of scores [..., E], in any order, as k rounds of argmax-and-mask."""
    ids = torch.arange(scores.shape[-1], device=scores.device)
    picked = []
    for _ in range(k):
        best = scores.argmax(dim=-1, keepdim=True)
        picked.append(best)
        scores = scores.masked_fill(ids == best, float("-inf"))
    return torch.cat(picked, dim=-1)


def fused_gather(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, down_kernel=None) -> torch.Tensor:
    """x: [N, D], weights/indices: [N, K], gate_up: [E, 2I, D], down: [E, D, I] -> Σ_k w_k FFN_{i_k}(x): [N, D],
    in fp32 products as one multiply-and-sum per projection. down_kernel: what computes the down projection and the
    weighted sum from the hiddens [N, K, I] (default `gathered_down`; dsv3/fast/triton_moe.py's `routed_down`)."""
    N, K = indices.shape
    flat = indices.flatten()  # [N·K]
    w = gate_up[flat].view(N, K, *gate_up.shape[1:]).float()  # [N, K, 2I, D]
    I, xs = down.shape[-1], x.float()[:, None, None, :]
    # gate and up as two reductions over the same [N, K, I] rows (inductor runs them in one loop), so that the
    # hidden (rounded where bmm's input is) has their shape and is stored as they finish (`stored`)
    gate, up = (w[:, :, :I] * xs).sum(-1), (w[:, :, I:] * xs).sum(-1)  # [N, K, I] each
    h = stored((F.silu(gate) * up).to(x.dtype))
    return (down_kernel or gathered_down)(h, weights, indices, down)


def gathered_down(h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """fused_gather's down projection: h [N, K, I], weights/indices [N, K], down [E, D, I] -> Σ_k w_k down_k h_k
    [N, D], as a multiply-and-sum over the gathered weights (each expert's output rounded to h's dtype)."""
    N, K = indices.shape
    y = (down[indices.flatten()].view(N, K, *down.shape[1:]).float() * h.float()[:, :, None, :]).sum(-1)  # [N, K, D]
    return (y.to(h.dtype) * weights[:, :, None].to(h.dtype)).sum(dim=1)


def every_expert(experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Σ_e FFN_e(x) · (weight of e where chosen, else 0): [N, D], for experts: a list of E modules."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        out = out + expert(x) * (weights * (indices == e)).sum(-1, keepdim=True).to(x.dtype)
    return out


class ArgmaxGate:
    """For `dsv3.moe.Gate`: top-k as argmax rounds inside compiled graphs."""

    def top_indices(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return argmax_top_indices(scores, k)
        return super().top_indices(scores, k)


class CompiledMoE:
    """For `dsv3.moe.MoE`: inside a compiled graph, the path from COMPILED_PATHS (or `path` when set) with the
    formulations above. The stacks are read as built by the eager warm-up (`prepare`): no checks in the graph.

    `routed_down_kernel`: None (inductor compiles the gathered down projection), or, set on a module,
    `dsv3.fast.triton_moe.routed_down` to run it on a GPU as one hand-written Triton kernel."""

    routed_down_kernel = None

    def pairs_on_host(self, x: torch.Tensor) -> tuple | None:
        """Inside a graph the router runs as tensors (reading its choices on the host would break the graph)."""
        return None if torch.compiler.is_compiling() else super().pairs_on_host(x)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *,
               decode_step: bool = False) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().routed(x, weights, indices, decode_step=decode_step)
        stacks = None if self.path == "loop" or torch.is_grad_enabled() else self.stacks.tensors
        if stacks is None:
            return every_expert(self.experts, x, weights, indices)
        path = self.path
        if path == "auto":
            cpu, grouped = x.device.type == "cpu", grouped_mm_runs(x)
            path = COMPILED_PATHS[cpu, grouped, decode_step if cpu else grouped and indices.numel() <= self.few_pairs]
        if path == "grouped":
            return self.routed_grouped(x, weights, indices, *self.stacks.dense(x.dtype))
        return fused_gather(x, weights, indices, *stacks, down_kernel=self.routed_down_kernel if x.is_cuda else None)

    def grouped_mm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if a.is_cpu and torch.compiler.is_compiling():
            return cpu_grouped_mm(a, b, offs)
        return super().grouped_mm(a, b, offs)
