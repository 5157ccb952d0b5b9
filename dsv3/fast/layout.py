"""Weight storage order for CPU products with a few rows: the layout that a BLAS reads fastest, chosen per matrix.

nn.Linear stores W: [N, K] row by row (K contiguous), so `x @ Wᵀ` for one row x: [1, K] is BLAS's transposed sgemv:
N dot products over rows of K floats, each ending in a horizontal sum. With short rows and many of them (the lm_head:
8192 rows of 256 floats) that runs at ~7 GB/s on the CPUs we measured, half of what one core can read. Stored
column by column (the same values, strides (1, N)), `F.linear` hands BLAS the non-transposed form: K scaled columns
summed into an output of N floats, one long stream, 2.5x faster for the lm_head (docs/results.md, stop 36). Where N
is short or K long, rows stay faster, so the choice is per matrix:
`python bench/cpu_layout.py` prints the ratio over a grid of shapes for the CPU it runs on.

`arrange(model)` applies the choice in place to every nn.Linear; `dsv3.generate` and the Engine call it. Values
are unchanged, but the products round in another order (float32 rounding).
"""

from __future__ import annotations

import torch
from torch import nn


def prefers_columns(weight: torch.Tensor) -> bool:
    """Whether W: [N, K] multiplies a few rows faster stored by columns: a float32 CPU matrix whose output is at least
    512 long and twice its input (bench/cpu_layout.py's grid: 1.2-2.5x faster there; up to 1.5x slower where N is
    256 or less, or where K exceeds N). GPUs and other dtypes keep rows: bf16 gains nothing on the same CPUs."""
    rows, cols = weight.shape
    return weight.dtype == torch.float32 and rows >= max(2 * cols, 512) and weight.device.type == "cpu"


def by_columns(weight: torch.Tensor) -> bool:
    """W: [N, K] stored column by column (strides (1, N))."""
    return weight.stride(0) == 1 and weight.t().is_contiguous()


def arrange(model: nn.Module) -> nn.Module:
    """Store each nn.Linear weight of `model` as `prefers_columns` says (in place, idempotent; a weight that moved
    to another dtype or device goes back to rows). The parameters stay the same objects, and keep what they were:
    each copy is made in the inference mode its parameter was made in (a normal tensor still trains after
    `generate`; a model loaded under `torch.inference_mode()` keeps inference tensors). Returns the model. When
    nothing moves it costs ~0.5 ms on the bundled model (300 linears, most of it walking the modules), which
    `generate` pays once a call."""
    for module in model.modules():
        weight = module._parameters.get("weight") if isinstance(module, nn.Linear) else None  # no __getattr__
        if weight is None:
            continue
        columns = prefers_columns(weight)
        if columns != by_columns(weight):
            with torch.inference_mode(weight.is_inference()), torch.no_grad():
                weight.data = weight.data.t().contiguous().t() if columns else weight.data.contiguous()
    return model
