"""Quantized kernels on a GPU against their reference (dequantise, then matmul); skipped without CUDA.

- FP8 (sm90): `FP8Linear` through cuBLAS's blockwise-scaled e4m3 GEMM at every number of rows 1..256 (cuBLAS
  rejected M = 1, 2, 6 before the rows were padded to a multiple of 16), within the e4m3 rounding bound of the
  activations (tests/quant_utils.e4m3_bound; the weight is the same fp8 tensor on both sides).
- INT4 (tinygemm, sm80+) and INT8 at M in {1, 2, 3, 8, 16, 64, 256} (INT4 also at widths its group does not divide):
  both sides use the same quantized weight and accumulate in float32; they differ only by summation order and bf16
  rounding, ~2^-8 relative.
"""

import pytest
import torch

from dsv3.quant import FP8Linear, Int4Linear, Int8Linear
from dsv3.quant.fp8 import quantize_activations
from quant_utils import e4m3_bound, linear, rel

CUDA = torch.cuda.is_available()
SM90 = CUDA and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
SHAPES = [(1408, 2048), (2048, 1408)]  # V2-Lite's expert gate/up and down: K/128 = 16 and 11 (scale_b padded to 12)


@pytest.mark.skipif(not SM90, reason="FP8 block-scaled scaled_mm needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("out_dim, in_dim", SHAPES)
def test_fp8_kernel_at_every_row_count(out_dim, in_dim):
    q = FP8Linear.from_linear(linear(out_dim, in_dim, torch.bfloat16)).cuda()
    assert q.kernel_ready
    w = q.dequantize(torch.float32)
    x = torch.randn(256, in_dim, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x = (x * torch.logspace(-2, 1, in_dim, device="cuda")).to(torch.bfloat16)  # tiles of different scales
    for m in range(1, 257):
        y = q(x[:m])  # impl "auto": the kernel
        _, scale_a = quantize_activations(x[:m])
        err = (y.float() - x[:m].float() @ w.t()).abs()
        assert y.shape == (m, out_dim) and (err <= e4m3_bound(x[:m].float(), scale_a, w)).all(), f"M = {m}"


@pytest.mark.parametrize("cls, kwargs", [(Int4Linear, {"group_size": 128}), (Int4Linear, {"group_size": 32}),
                                         (Int8Linear, {})])
@pytest.mark.parametrize("out_dim, in_dim", SHAPES)
def test_int_kernels_match_reference(cls, kwargs, out_dim, in_dim):
    lin = linear(out_dim, in_dim, torch.bfloat16)
    w = cls.from_linear(lin, **kwargs).dequantize(torch.float32).cuda()  # the reference weight, from a CPU copy
    q = cls.from_linear(lin, **kwargs).cuda()
    assert q.kernel_ready
    x = torch.randn(256, in_dim, dtype=torch.bfloat16, device="cuda")
    for m in (1, 2, 3, 8, 16, 64, 256):
        assert rel(q(x[:m]), x[:m].float() @ w.t()) < 1e-2, f"M = {m}"
    assert q.impl == "auto" and getattr(q, "layout", "cuda") == "cuda"  # the kernel ran: nothing fell back
    back = q.cpu()  # the portable layout again, exactly
    assert torch.equal(back.dequantize(torch.float32), w.cpu())


@pytest.mark.parametrize("in_dim", [200, 64])
def test_int4_kernel_at_widths_its_group_does_not_divide(in_dim):
    """A width g128 does not divide runs at its width rounded to 32 in smaller kernel groups (`kernel_width`: 224 in
    groups of 32, 64 in one of 64): against the reference, and back to the portable layout exactly."""
    lin = linear(256, in_dim, torch.bfloat16)
    w = Int4Linear.from_linear(lin, group_size=128).dequantize(torch.float32).cuda()
    q = Int4Linear.from_linear(lin, group_size=128).cuda()
    assert q.kernel_ready and q.layout == "cuda" and q.kernel_in < q.padded_in
    x = torch.randn(64, in_dim, dtype=torch.bfloat16, device="cuda")
    for m in (1, 3, 64):
        assert rel(q(x[:m]), x[:m].float() @ w.t()) < 1e-2, f"M = {m}"
    assert torch.equal(q.cpu().dequantize(torch.float32), w.cpu())
