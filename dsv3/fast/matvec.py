"""The compiled CPU decode step's compiler: inductor, with products of a few rows as inductor's own reductions.

In a decode step at batch 1 every projection is a matrix-vector product, x [1, K] @ Wᵀ [K, N], and the absorbed
attention's scores are one of a few rows (a query row per head against the cached latents). Inductor's CPU rules
(torch/_inductor/decomposition.py, `mm` and `bmm`) hand those to the library: MKL's sgemm for fp32, which packs its
operand first (a copy of the weight for one use), and oneDNN for bf16, which builds a primitive per call. On the
2-core AVX-512 EPYC test machine the compiled step of the bundled model read its ~20 MB of fp32 weights that way at
~6 GB/s. As a multiply-and-sum over K, inductor generates a vectorised loop that reads each weight once, at ~13 GB/s
(one core's memory bandwidth there: ~14-15 GB/s), fused with the norm or activation before it. This is what inductor
does on a GPU under coordinate-descent tuning (gpt-fast's setting). Measured in docs/results.md (stop 35).

The reduction reads b once per row of a, so it pays only for a few rows (FEW_ROWS), and only where K is b's
contiguous dimension (nn.Linear's Wᵀ, the cache's transposed latents): a strided K is read element by element.
"""

from __future__ import annotations

import functools

import torch

aten = torch.ops.aten
# rows up to which a product is a reduction; the bundled model's compiled fp32 decode step at batch 2, 4 and 8, with
# its matmuls as reductions against the library's: 3.39 against 5.40 ms, 4.75 against 5.60, 7.12 against 7.15
FEW_ROWS = 4


def few_rows(rows: int | torch.SymInt) -> bool:
    """rows <= FEW_ROWS, known when compiling, without adding a guard: a batch size is a static size in
    torch.compile until a second one is seen, and a dynamic one is never "few"."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true  # imported when tracing (~0.3 s)
    return statically_known_true(rows <= FEW_ROWS)


def few_row_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] -> [..., M, N] as Σ_k a_mk b_kn, for CPU tensors with `few_rows(M)` and K b's
    contiguous dimension; otherwise NotImplemented (inductor's own rules decide)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    if a.device.type == "cpu" and few_rows(a.shape[-2]) and statically_known_true(b.stride(-2) == 1):
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return NotImplemented


@functools.cache
def decompositions() -> dict:
    """Inductor's decomposition table with `few_row_product` tried before its own `mm` and `bmm` rules."""
    from torch._inductor.decomposition import select_decomp_table  # inductor: imported when compiling (~2 s)
    table = dict(select_decomp_table())
    for op in (aten.mm.default, aten.bmm.default):
        table[op] = functools.partial(_few_rows_first, table[op])
    return table


def _few_rows_first(inductor_rule, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = few_row_product(a, b)
    return inductor_rule(a, b) if out is NotImplemented else out


def cpu_decode_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """A torch.compile backend: inductor with its C++ wrapper (the ~100 kernel calls of a step are made from C++,
    not Python: ~15% faster a token on the bundled model) and `decompositions()`. AOTAutograd's cache is off for it:
    its key does not cover the decomposition table, so it would hand back a graph compiled without `few_row_product`
    (inductor's own cache, keyed on the decomposed graph, still serves)."""
    from torch._inductor.compile_fx import compile_fx
    functorch = torch._functorch.config  # the cache came with torch 2.5
    with functorch.patch({"enable_autograd_cache": False} if hasattr(functorch, "enable_autograd_cache") else {}):
        return compile_fx(gm, example_inputs, decompositions=decompositions(), config_patches={"cpp_wrapper": True})
