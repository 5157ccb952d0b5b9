"""The compiled CPU decode step's compiler: inductor, with one-row matrix products as inductor's own reductions.

At batch 1 every projection of a decode step is a matrix-vector product, x [1, K] @ Wᵀ [K, N]. Inductor's CPU rules
(torch/_inductor/decomposition.py, `mm`) hand each of those to the library (MKL's sgemm, which packs its operand
first: a copy of the weight for one use). On the 2-core AVX-512 EPYC test machine the compiled step of the bundled
model read its ~20 MB of fp32 weights that way at ~6 GB/s. As a multiply-and-sum over K, inductor generates a
vectorised loop that reads each weight once, at ~13 GB/s (one core's memory bandwidth there: ~14-15 GB/s), fused with
the norm or activation before it. This is what inductor does on a GPU under coordinate-descent tuning (gpt-fast's
setting). Measured in docs/results.md (stop 35).

More rows keep the library: a weight read once serves them all there, and the reduction would read it once per row.
"""

from __future__ import annotations

import functools

import torch

aten = torch.ops.aten


def one_row_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [1, K] @ b [K, N] -> [1, N] as Σ_k a_k b_kn, for CPU tensors of one row known when compiling (a batch of
    one is a static size in torch.compile); otherwise NotImplemented (inductor's own rules decide)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true  # imported when tracing (~0.3 s)
    if a.device.type == "cpu" and statically_known_true(a.shape[0] == 1):
        return (a.unsqueeze(2) * b.unsqueeze(0)).sum(1)
    return NotImplemented


@functools.cache
def decompositions() -> dict:
    """Inductor's decomposition table with `one_row_mm` tried before its own `mm` rule."""
    from torch._inductor.decomposition import select_decomp_table  # inductor: imported when compiling (~2 s)
    table = dict(select_decomp_table())
    inductor_mm = table[aten.mm.default]

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = one_row_mm(a, b)
        return inductor_mm(a, b) if out is NotImplemented else out
    table[aten.mm.default] = mm
    return table


def cpu_decode_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """A torch.compile backend: inductor with its C++ wrapper (the ~100 kernel calls of a step are made from C++,
    not Python: ~15% faster a token on the bundled model) and `decompositions()`. AOTAutograd's cache is off for it:
    its key does not cover the decomposition table, so it would hand back a graph compiled without `one_row_mm`
    (inductor's own cache, keyed on the decomposed graph, still serves)."""
    from torch._inductor.compile_fx import compile_fx
    functorch = torch._functorch.config  # the cache came with torch 2.5
    with functorch.patch({"enable_autograd_cache": False} if hasattr(functorch, "enable_autograd_cache") else {}):
        return compile_fx(gm, example_inputs, decompositions=decompositions(), config_patches={"cpp_wrapper": True})
