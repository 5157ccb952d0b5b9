"""Stacked quantized experts (dsv3/quant/experts.py): the same weights as each expert's own dequantisation, one copy
in memory, and the gathered / grouped routed paths equal to the per-expert reference."""

import pytest
import torch

import dsv3
from dsv3.moe import MoE
from dsv3.quant import quantize
from dsv3.quant.experts import PROJECTIONS, QuantizedExperts

SCHEMES = [("int8", {}), ("int4", {"group_size": 32}), ("fp8", {})]


def quantized_moe(scheme, kwargs, dtype=torch.float32) -> MoE:
    torch.manual_seed(0)
    # widths that are not multiples of fp8's 128-blocks nor of int4's groups (padded): the edge cases
    config = dsv3.ModelConfig.tiny(hidden_size=96, moe_intermediate_size=48, n_routed_experts=8,
                                   num_experts_per_tok=3, first_k_dense_replace=0, num_hidden_layers=1)
    model = dsv3.Transformer(config).to(dtype).eval()
    quantize(model, scheme, pad=True, **kwargs)
    return model.model.layers[0].mlp


@pytest.mark.parametrize("scheme,kwargs", SCHEMES)
def test_stacks_dequantise_as_each_expert_and_hold_one_copy(scheme, kwargs):
    moe = quantized_moe(scheme, kwargs)
    expected = [[moe.experts[e]._modules[p].dequantize(torch.float32) for p in PROJECTIONS]
                for e in range(moe.n_experts)]
    stacks = QuantizedExperts.build(moe.experts)
    flat = torch.tensor([5, 0, 5, 7])
    for rows, p in zip(stacks.gathered(flat, torch.float32), range(3)):
        assert torch.equal(rows, torch.stack([expected[e][p] for e in flat.tolist()]))
    gate_up, down = stacks.dense(torch.float32)
    assert torch.equal(down[3], expected[3][2]) and torch.equal(gate_up[3], torch.cat(expected[3][:2]))
    for e, expert in enumerate(moe.experts):  # the experts' buffers are views of the stacks: one copy in memory
        layer = expert.up_proj
        for name in stacks.up.names:
            assert layer._buffers[name].data_ptr() == stacks.up.tensors[name][e].data_ptr()
        # ... and still the layer the loop path calls (int4 without its tinygemm layout: dequantised)
        x = torch.randn(2, 96)
        torch.testing.assert_close(layer(x), x @ expected[e][1].t(), rtol=1e-5, atol=1e-6)
    assert stacks.current(moe.experts)
    # reloading copies into the views (int8, fp8: the stacks see the new values) or repacks (int4: stale stacks)
    state = moe.state_dict()
    moe.load_state_dict({k: v.flip(0) if "experts.3.down_proj" in k else v for k, v in state.items()})
    if stacks.current(moe.experts):
        assert torch.equal(stacks.down.rows(torch.tensor([3]), torch.float32)[0],
                           moe.experts[3].down_proj.dequantize(torch.float32))
    else:
        assert scheme == "int4"
    moe.experts[1].gate_proj = moe.experts[0].gate_proj  # a replaced module: stale
    assert not stacks.current(moe.experts)


@pytest.mark.parametrize("scheme,kwargs", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_and_grouped_paths_match_the_reference(scheme, kwargs, dtype):
    moe = quantized_moe(scheme, kwargs, dtype)
    x = torch.randn(5, 96, dtype=dtype)
    weights, indices, _ = moe.gate(x)
    with torch.no_grad():
        expected = moe.routed_reference(x, weights, indices)
        stacks = QuantizedExperts.build(moe.experts)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(stacks.routed_gather(x, weights, indices), expected, **tol)
        torch.testing.assert_close(moe.routed_grouped(x, weights, indices, *stacks.dense(dtype)), expected, **tol)


def test_mixed_or_unquantized_experts_are_not_stacked():
    moe = quantized_moe("int8", {})
    assert QuantizedExperts.build(moe.experts) is not None
    moe.experts[2].down_proj = torch.nn.Linear(48, 96, bias=False)  # e.g. one expert left unquantized
    assert QuantizedExperts.build(moe.experts) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme,kwargs", SCHEMES)
def test_stacked_paths_on_cuda_from_the_kernel_layouts(scheme, kwargs):
    """On a GPU the experts start in their kernel layouts (int4: tinygemm tiles), which stacking undoes."""
    moe = quantized_moe(scheme, kwargs, torch.bfloat16).cuda()
    x = torch.randn(7, 96, dtype=torch.bfloat16, device="cuda")
    weights, indices, _ = moe.gate(x)
    with torch.no_grad():
        expected = moe.routed_reference(x, weights, indices)
        stacks = QuantizedExperts.build(moe.experts)
        torch.testing.assert_close(stacks.routed_gather(x, weights, indices), expected, rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(moe.routed_grouped(x, weights, indices, *stacks.dense(torch.bfloat16)), expected,
                                   rtol=2e-2, atol=2e-3)
