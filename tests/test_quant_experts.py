"""Stacked quantized experts (dsv3/quant/experts.py): the same weights as each expert's own dequantisation, one copy
in memory, and the MoE's gathered / grouped paths (eager, and the compiled graph's formulation) on them equal to
the per-expert reference."""

import sys

import pytest
import torch

import dsv3
from dsv3.fast.moe import fused_gather
from dsv3.moe import ExpertStacks, MoE
from dsv3.quant import QuantizedLinear, quantize
from dsv3.quant.experts import PROJECTIONS, QuantizedExpertStacks

SCHEMES = [("int8", {}), ("int4", {"group_size": 32}), ("fp8", {})]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def quantized_moe(scheme, kwargs, dtype=torch.float32, device="cpu") -> MoE:
    torch.manual_seed(0)
    # widths that are not multiples of fp8's 128-blocks nor of int4's groups (padded): the edge cases
    config = dsv3.ModelConfig.tiny(hidden_size=96, moe_intermediate_size=48, n_routed_experts=8,
                                   num_experts_per_tok=3, first_k_dense_replace=0, num_hidden_layers=1)
    model = dsv3.Transformer(config).to(dtype).to(device).eval()
    quantize(model, scheme, pad=True, **kwargs)
    return model.model.layers[0].mlp


@pytest.mark.parametrize("scheme,kwargs", SCHEMES)
@torch.no_grad()
def test_stacks_dequantise_as_each_expert_and_hold_one_copy(scheme, kwargs):
    moe = quantized_moe(scheme, kwargs)
    assert isinstance(moe.stacks, QuantizedExpertStacks)  # installed by quantize
    # on a CPU int4 experts keep their kernel layout (no stacks); int8 and fp8 ones stack (dsv3.quant.experts
    # `stacks_on_cpu`), except for a few pairs in eager
    assert (moe.stacks.get(moe.experts) is None) == (scheme == "int4")
    assert moe.stacks.get(moe.experts, few_on_cpu=True) is None
    expected = [[moe.experts[e]._modules[p].dequantize(torch.float32) for p in PROJECTIONS]
                for e in range(moe.n_experts)]
    stacks = QuantizedExpertStacks(cpu=True)
    gate_up, down = stacks.get(moe.experts)
    flat = torch.tensor([5, 0, 5, 7])
    assert torch.equal(gate_up[flat], torch.stack([torch.cat(expected[e][:2]) for e in flat.tolist()]))
    assert torch.equal(down[flat], torch.stack([expected[e][2] for e in flat.tolist()]))
    assert torch.equal(gate_up[3], torch.cat(expected[3][:2])) and gate_up.shape == (8, 96, 96)
    dense_gate_up, dense_down = stacks.dense(torch.float32)
    assert torch.equal(dense_down[3], expected[3][2]) and torch.equal(dense_gate_up[3], torch.cat(expected[3][:2]))
    up = stacks.projections[1]
    for e, expert in enumerate(moe.experts):  # the experts' buffers are views of the stacks: one copy in memory
        for name in up.names:
            assert expert.up_proj._buffers[name].data_ptr() == up.tensors[name][e].data_ptr()
        x = torch.randn(2, 96)  # ... and each expert still the layer the loop calls (int4: dequantised)
        torch.testing.assert_close(expert.up_proj(x), x @ expected[e][1].t(), **TOL[torch.float32])
    assert stacks.current(moe.experts)
    # reloading copies into the views (int8, fp8: the stacks see the new values) or repacks (int4: rebuilt)
    state = moe.state_dict()
    moe.load_state_dict({k: v.flip(0) if "experts.3.down_proj" in k else v for k, v in state.items()})
    assert stacks.current(moe.experts) != (scheme == "int4")
    assert torch.equal(stacks.get(moe.experts)[1][3], moe.experts[3].down_proj.dequantize(torch.float32))
    moe.experts[1].gate_proj = moe.experts[0].gate_proj  # a replaced module: stale, then rebuilt
    assert not stacks.current(moe.experts)


@pytest.mark.parametrize("scheme,kwargs", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_moe_paths_on_stacked_quantized_experts_match_the_reference(scheme, kwargs, dtype):
    moe = quantized_moe(scheme, kwargs, dtype)
    x = torch.randn(5, 96, dtype=dtype)
    weights, indices, _ = moe.gate(x)
    expected = moe.routed_reference(x, weights, indices)
    moe.stacks = QuantizedExpertStacks(cpu=True)
    for path in ("auto", "gather", "grouped", "pairs"):  # auto: the loop on a CPU
        moe.path = path
        torch.testing.assert_close(moe.routed(x, weights, indices), expected, **TOL[dtype])
    # the compiled graph's formulation (dsv3/fast/moe.py), called eagerly on the dequantising stacks
    torch.testing.assert_close(fused_gather(x, weights, indices, *moe.stacks.tensors), expected, **TOL[dtype])


@pytest.mark.parametrize("scheme,kwargs", SCHEMES[:2])
def test_quantized_experts_on_a_cpu_run_pairs_through_their_modules(scheme, kwargs, monkeypatch):
    """On a CPU "auto" runs a few (token, expert) pairs of int8 / int4 experts through the expert modules (their own
    kernels), training through the loop, and many pairs: int4 through the loop, int8 through the grouped matmuls on
    its stacks where its layers' dense path wins for many rows (AVX-512), else the loop; all equal the reference."""
    moe = quantized_moe(scheme, kwargs, torch.bfloat16)
    many = "routed_grouped" if scheme == "int8" else "routed_loop"

    def place(dense_above_rows):  # what the layers' placement decides (QuantizedLinear._place)
        for layer in moe.modules():
            if isinstance(layer, QuantizedLinear):
                layer.dense_above_rows = dense_above_rows
    place(64)  # the dense path above 64 rows, as int8's on an AVX-512 CPU
    called = []
    for name in ("routed_loop", "routed_pairs", "routed_grouped"):
        original = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _n=name, _f=original: called.append(_n) or _f(*a))
    for rows in (1, 2, 6):  # 3, 6 and 18 pairs; few_pairs is 16
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        with torch.no_grad():
            weights, indices, _ = moe.gate(x)
            torch.testing.assert_close(moe.routed(x, weights, indices), moe.routed_reference(x, weights, indices),
                                       **TOL[torch.bfloat16])
    assert called == ["routed_pairs", "routed_pairs", many]
    called.clear()
    moe.routed(x[:1], weights[:1], indices[:1])  # gradients enabled: the loop
    assert called == ["routed_loop"]
    place(sys.maxsize)  # the kernel at every row count, as on an AVX2 CPU with bf16
    called.clear()
    with torch.no_grad():
        moe.routed(x, weights, indices)
    assert called == ["routed_loop"]
    place(64)  # experts too large to dequantise all at once (a real checkpoint's): the loop
    monkeypatch.setattr(dsv3.quant.experts, "CPU_GROUPED_MAX_WEIGHTS", 8 * 3 * 48 * 96 - 1)
    called.clear()
    with torch.no_grad():
        moe.routed(x, weights, indices)
    assert called == ["routed_loop"]


def test_fp8_experts_on_a_cpu_are_stacked_and_read_by_moving_bits(monkeypatch):
    """fp8 has no CPU kernel (each expert's own forward dequantises), so its experts stack on a CPU too: "auto"
    runs many pairs through the grouped matmuls, dequantising every expert at once by moving bits
    (`dsv3.hub.dequantize_fp8_rows`) unless an expert holds a NaN code, which the reference carries; a few pairs go
    through the expert layers. Both equal the reference."""
    import dsv3.quant.experts as experts
    moe = quantized_moe("fp8", {}, torch.bfloat16)
    called, reads = [], []
    for name in ("routed_gather", "routed_grouped", "routed_loop", "routed_pairs"):
        original = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _n=name, _f=original: called.append(_n) or _f(*a))
    monkeypatch.setattr(experts, "dequantize_fp8_rows", lambda *a: reads.append(a[0].shape) or
                        dsv3.hub.dequantize_fp8_rows(*a))
    with torch.no_grad():
        for rows in (1, 6):  # 3 and 18 pairs; few_pairs is 16
            x = torch.randn(rows, 96, dtype=torch.bfloat16)
            weights, indices, _ = moe.gate(x)
            torch.testing.assert_close(moe.routed(x, weights, indices), moe.routed_reference(x, weights, indices),
                                       **TOL[torch.bfloat16])
        assert called == ["routed_pairs", "routed_grouped"]
        assert reads == [(8, 48, 96), (8, 48, 96), (8, 96, 48)]  # gate, up, down of every expert, once each
        nan = moe.experts[2].up_proj.weight.view(torch.uint8).clone()
        nan[0, 0] = 0x7F  # a NaN code: that layer's stack (up) takes the reference, which keeps the NaN
        moe.experts[2].up_proj.load_state_dict({"weight": nan.view(torch.float8_e4m3fn),
                                               "weight_scale_inv": moe.experts[2].up_proj.weight_scale_inv})
        reads.clear()
        assert moe.stacks.dense(torch.bfloat16)[0][2].isnan().any() and reads == [(8, 48, 96), (8, 96, 48)]


def test_which_quantized_experts_stack_on_a_cpu():
    """fp8 (no CPU kernel) and int8 stack on a CPU, int8 only where each expert's weight stays CPU_ALIGN-aligned as a
    view of the stack (its kernel's aligned loads crash the process otherwise); int4 keeps tinygemm's layout."""
    from dsv3.layers import MLP
    from dsv3.quant.experts import stacks_on_cpu
    from dsv3.quant.fp8 import FP8Linear
    from dsv3.quant.int4 import Int4Linear
    from dsv3.quant.int8 import CPU_ALIGN, Int8Linear

    def expert(cls, dim, inter, **kw):
        mlp = MLP(dim, inter).to(torch.bfloat16)
        for p in PROJECTIONS:
            setattr(mlp, p, cls.from_linear(getattr(mlp, p), **kw))
        return mlp

    assert stacks_on_cpu(expert(FP8Linear, 36, 20))
    assert stacks_on_cpu(expert(Int8Linear, 256, 64)) and (36 * 20) % CPU_ALIGN
    assert not stacks_on_cpu(expert(Int8Linear, 36, 20))
    assert not stacks_on_cpu(expert(Int4Linear, 256, 64, group_size=32))


def test_unquantized_or_mixed_experts_keep_the_plain_stacks_or_the_loop():
    torch.manual_seed(0)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny()).eval()
    quantize(model, "int8", skip=("embed", "lm_head", "gate", "experts.3."))  # one expert left in float
    moe = model.model.layers[-1].mlp
    assert type(moe.stacks) is ExpertStacks  # not all experts quantized alike: no quantized stacks
    assert QuantizedExpertStacks(cpu=True).get(moe.experts) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme,kwargs", SCHEMES)
@torch.no_grad()
def test_stacked_paths_on_cuda_from_the_kernel_layouts(scheme, kwargs):
    """On a GPU the experts start in their kernel layouts (int4: tinygemm tiles), which stacking undoes; "auto"
    gathers for a few rows and runs the grouped matmuls for many."""
    moe = quantized_moe(scheme, kwargs, torch.bfloat16, "cuda")
    for rows in (1, 40):
        x = torch.randn(rows, 96, dtype=torch.bfloat16, device="cuda")
        weights, indices, _ = moe.gate(x)
        expected = moe.routed_reference(x, weights, indices)
        assert moe.choose_path(x, indices.numel(), rows == 1) == ("gather" if rows == 1 else "grouped")
        torch.testing.assert_close(moe.routed(x, weights, indices), expected, **TOL[torch.bfloat16])


@torch.no_grad()
def test_quantized_stacks_step_aside_when_an_expert_becomes_plain():
    moe = quantized_moe("int8", {})
    moe.experts[0] = torch.nn.Module()  # an expert replaced by plain (unquantized) linears: no stacks, no error
    moe.experts[0].gate_proj = moe.experts[0].up_proj = moe.experts[0].down_proj = torch.nn.Linear(96, 96)
    assert QuantizedExpertStacks(cpu=True).get(moe.experts) is None
