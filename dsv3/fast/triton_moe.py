"""The routed experts' down projection at decode as one hand-written Triton kernel (GPU), beside its reference.

In a compiled GPU decode step the MoE runs `fused_gather` (dsv3/fast/moe.py), and inductor turns its down projection
Σ_k w_k · W_down[e_k] h_k into a reduction kernel that ran at 1.4 TB/s on an H200 (V2-Lite shape, batch 1: 24.6 µs
for 34.6 MB, 11 layers = 19.5% of the step), where the gate/up kernel before it reached 3.5 TB/s (issue 21,
docs/results.md). `routed_down` is that projection as one kernel: program (n, j) computes output rows
j·BLOCK_D ... j·BLOCK_D + BLOCK_D - 1 of token n, reading each chosen expert's [BLOCK_D, I] weight slice once in
[BLOCK_D, BLOCK_I] tiles along I (contiguous in the [E, D, I] stack: coalesced loads), accumulating the K experts'
weighted products in float32 and rounding once.

`routed_down_reference` is the definition it is tested against (tests/test_triton_moe.py: Triton's interpreter on
a CPU, the compiled kernel on a GPU). `CompiledMoE.routed_down_kernel` selects it inside compiled graphs (it is not the
default until a GPU run shows it faster than inductor's: bench/gpu_ceilings.py times both, `bench/decode.py
--triton-down` the whole compiled step). This module needs triton (installed with torch's CUDA builds; the `dev`
extra installs it for the interpreter test).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 16  # output rows per program: D / 16 programs per token (128 for V2-Lite's D = 2048)
BLOCK_I = 128  # inputs per tile: one [16, 128] bf16 tile is 4 KB


def routed_down_reference(h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                          down: torch.Tensor) -> torch.Tensor:
    """h: [N, K, I] SwiGLU hiddens of each token's K experts, weights/indices: [N, K], down: [E, D, I] ->
    Σ_k w_k · down[indices_k] @ h_k: [N, D] in h's dtype, computed in float32 and rounded once."""
    w = down[indices].float()  # [N, K, D, I]
    y = (w @ h.float()[..., None]).squeeze(-1)  # [N, K, D]
    return (y * weights.float()[..., None]).sum(dim=1).to(h.dtype)


@triton.jit
def _routed_down_kernel(h_ptr, w_ptr, ids_ptr, down_ptr, out_ptr, D, I,
                        K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr):
    n = tl.program_id(0)  # the token
    rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # its output rows here: [BLOCK_D]
    row_ok = rows < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(K):
        e = tl.load(ids_ptr + n * K + k).to(tl.int64)  # int64: E·D·I exceeds 2^31 for V3 (256·7168·2048)
        part = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            cols = i0 + tl.arange(0, BLOCK_I)
            col_ok = cols < I
            hk = tl.load(h_ptr + (n * K + k) * I + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_I]
            tile = tl.load(down_ptr + e * D * I + rows[:, None] * I + cols[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_I]
            part += tl.sum(tile * hk[None, :], axis=1)
        acc += tl.load(w_ptr + n * K + k).to(tl.float32) * part
    tl.store(out_ptr + n * D + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def routed_down(h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`routed_down_reference` through `_routed_down_kernel`: [N, D] in h's dtype."""
    N, K, I = h.shape
    E, D, I_down = down.shape
    if I_down != I or weights.shape != (N, K) or indices.shape != (N, K):
        raise ValueError(f"routed_down: h {tuple(h.shape)}, weights {tuple(weights.shape)}, indices "
                         f"{tuple(indices.shape)} and down {tuple(down.shape)} do not fit [N, K, I], [N, K], [E, D, I]")
    out = h.new_empty(N, D)
    grid = (N, triton.cdiv(D, BLOCK_D))
    _routed_down_kernel[grid](h.contiguous(), weights.float().contiguous(), indices.contiguous(), down.contiguous(),
                              out, D, I, K=K, BLOCK_D=BLOCK_D, BLOCK_I=BLOCK_I)
    return out
