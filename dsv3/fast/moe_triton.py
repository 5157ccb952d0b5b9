"""The routed experts' down projection of a decode step as one Triton kernel (issue 21; docs/performance.md §B6).

For the N·K (token, expert) pairs of a decode step, with h the SwiGLU hidden of each pair:
    y[n] = Σ_k w[n, k] · W_down[e[n, k]] @ h[n, k]        h: [N, K, I], W_down: [E, D, I], y: [N, D]
(paper-V3 §2.1.2 eq. 12, the routed sum). `gathered_down_reference` is that sum in plain PyTorch.

Why a kernel: compiled, inductor turns this into one reduction that also sums over K, so each of its programs
reduces K·I = 8448 elements for one of only N·D = 2048 outputs at batch 1 (V2-Lite shape), too little parallel
work to stream the 34.6 MB of weights: 24.6 us at 1.4 TB/s on an H200, against 3.5 TB/s for the gate/up
projection before it (bench/RESULTS.md, the decode step's kernel timeline). Here each program owns BLOCK_D rows of
D for one token and walks its K experts' rows (contiguous I-long rows of W_down), so the grid has
N · D / BLOCK_D programs (256 at batch 1), each streaming K·BLOCK_D rows with 16-byte loads, accumulating in fp32.
No atomics: the sum over K stays inside a program, so the result is deterministic.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the MoE keeps its PyTorch path
    triton = None


def gathered_down_reference(h: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                            down: torch.Tensor) -> torch.Tensor:
    """h: [N, K, I], indices: [N, K] expert ids, weights: [N, K] routing weights, down: [E, D, I] -> [N, D] in
    h's dtype: Σ_k w[n, k] · down[indices[n, k]] @ h[n, k], accumulated in fp32."""
    y = torch.einsum("nkdi,nki->nkd", down[indices].float(), h.float())  # [N, K, D]
    return (y * weights[..., None].float()).sum(dim=1).to(h.dtype)


if triton is not None:
    @triton.jit
    def _gathered_down_kernel(h_ptr, idx_ptr, w_ptr, down_ptr, out_ptr, D,
                              I: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr):
        """Program (n, j): out[n, j·BLOCK_D : (j+1)·BLOCK_D]. Tensors are contiguous: h [N, K, I], idx/w [N, K],
        down [E, D, I], out [N, D]."""
        n, j = tl.program_id(0), tl.program_id(1)
        rows = j * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D] output rows of D
        cols = tl.arange(0, BLOCK_I)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            e = tl.load(idx_ptr + n * K + k).to(tl.int64)
            w = tl.load(w_ptr + n * K + k).to(tl.float32)
            part = tl.zeros([BLOCK_D, BLOCK_I], dtype=tl.float32)
            for i0 in range(0, I, BLOCK_I):
                i = i0 + cols
                hv = tl.load(h_ptr + (n * K + k) * I + i, mask=i < I, other=0.0).to(tl.float32)  # [BLOCK_I]
                tile = tl.load(down_ptr + (e * D + rows[:, None]) * I + i[None, :],
                               mask=(rows[:, None] < D) & (i[None, :] < I), other=0.0)  # [BLOCK_D, BLOCK_I]
                part += tile.to(tl.float32) * hv[None, :]
            acc += w * tl.sum(part, axis=1)
        tl.store(out_ptr + n * D + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < D)


def launch_config(n: int, d: int, i: int) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK_D, BLOCK_I) for N tokens, output width D and hidden width I: 8 rows per program (256 programs
    for one V2-Lite token on 132 SMs), 256-wide I tiles (a row of I = 1408 in 6 masked steps)."""
    block_d, block_i = 8, min(256, triton.next_power_of_2(i))
    return (n, triton.cdiv(d, block_d)), block_d, block_i


def _launch(kernel, h: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """Run `kernel` (the jitted kernel, or it wrapped for torch.compile) on contiguous inputs: [N, D]."""
    N, K, I = h.shape
    out = torch.empty(N, down.shape[1], dtype=h.dtype, device=h.device)
    grid, block_d, block_i = launch_config(N, down.shape[1], I)
    kernel[grid](h, indices, weights, down, out, down.shape[1], I=I, K=K, BLOCK_D=block_d, BLOCK_I=block_i)
    return out


def gathered_down_triton(h: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                         down: torch.Tensor) -> torch.Tensor:
    """`gathered_down_reference` as one Triton launch (any device Triton runs on, the CPU interpreter too)."""
    return _launch(_gathered_down_kernel, h.contiguous(), indices.contiguous(), weights.float().contiguous(),
                   down.contiguous())


@functools.cache
def gathered_down_op():
    """`gathered_down_triton` as the custom op dsv3::gathered_down, which torch.compile puts into its graphs (and
    CUDA graphs) as a user-defined Triton kernel; registered at the first call."""
    from torch.library import triton_op, wrap_triton

    @triton_op("dsv3::gathered_down", mutates_args=())
    def gathered_down(h: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
        return _launch(wrap_triton(_gathered_down_kernel), h, indices, weights, down)

    def call(h, indices, weights, down):
        return gathered_down(h.contiguous(), indices.contiguous(), weights.float().contiguous(), down.contiguous())
    return call


def install(model: nn.Module) -> int:
    """Make every MoE layer of `model` on a CUDA device take this kernel for its gathered down projection (decode
    steps). Returns how many layers it was installed on (0 where Triton is missing or the model is not on CUDA)."""
    from ..moe import MoE
    if triton is None:
        return 0
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.gate.weight.is_cuda]
    for moe in layers:
        moe.gathered_down = gathered_down_op()
    return len(layers)
