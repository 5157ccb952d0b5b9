"""dsv3/fast/moe_triton.py: the routed down projection of a decode step as one Triton kernel, against its plain
PyTorch reference and against the MoE's own gathered path. The kernel runs here in Triton's CPU interpreter (a
subprocess: TRITON_INTERPRET is read when the kernel is defined); on a GPU the `gpu` tests run it compiled."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.fast.moe_triton import gathered_down_reference
from dsv3.moe import MoE

TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()


def _moe(dtype=torch.float32, **overrides) -> MoE:
    torch.manual_seed(0)
    config = ModelConfig(**{**dict(model_type="deepseek_v3", hidden_size=48, moe_intermediate_size=40,
                                   n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=1,
                                   topk_group=1), **overrides})
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe.to(dtype).eval()


def test_reference_is_the_sum_over_experts_of_weighted_down_projections():
    g = torch.Generator().manual_seed(0)
    h, down = torch.randn(2, 3, 5, generator=g), torch.randn(4, 6, 5, generator=g)
    indices, weights = torch.tensor([[0, 3, 1], [2, 2, 0]]), torch.rand(2, 3, generator=g)
    expected = torch.stack([sum(weights[n, k] * down[indices[n, k]] @ h[n, k] for k in range(3)) for n in range(2)])
    torch.testing.assert_close(gathered_down_reference(h, indices, weights, down), expected)


@pytest.mark.parametrize("n", [1, 5])
def test_moe_gather_path_with_an_installed_down_projection_equals_the_reference(n):
    """The hook MoE.gathered_down replaces only the down projection: installed (here with the reference
    function, which the kernel must equal), routed_gather still equals the per-token loop."""
    moe = _moe()
    x = torch.randn(n, 48, generator=torch.Generator().manual_seed(n))
    with torch.inference_mode():
        weights, indices, _ = moe.gate(x)
        expected = moe.routed_reference(x, weights, indices)
        moe.gathered_down = gathered_down_reference
        got = moe.routed_gather(x, weights, indices, *moe._stacked_weights())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not TRITON, reason="triton is not installed (it is in the dev extras on Linux x86-64)")
def test_triton_kernel_equals_the_reference_in_the_interpreter():
    """Shapes that exercise every mask: D not a multiple of BLOCK_D, I not a multiple of BLOCK_I (and I > BLOCK_I,
    so the I loop runs several tiles), one and several tokens, repeated experts; fp32 and bf16."""
    script = textwrap.dedent("""
        import torch
        from dsv3.fast.moe_triton import gathered_down_reference, gathered_down_triton
        g = torch.Generator().manual_seed(0)
        for N, K, E, D, I in [(1, 2, 4, 24, 40), (3, 3, 5, 17, 300), (2, 6, 8, 64, 64)]:
            h, down = torch.randn(N, K, I, generator=g), torch.randn(E, D, I, generator=g)
            idx, w = torch.randint(0, E, (N, K), generator=g), torch.rand(N, K, generator=g)
            ref = gathered_down_reference(h.double(), idx, w.double(), down.double())
            got = gathered_down_triton(h, idx, w, down)
            assert got.dtype == torch.float32 and ((got.double() - ref).norm() / ref.norm()) < 1e-6, (N, K, D, I)
            got = gathered_down_triton(h.bfloat16(), idx, w, down.bfloat16()).double()
            ref = gathered_down_reference(h.bfloat16().double(), idx, w.double(), down.bfloat16().double())
            assert ((got - ref).norm() / ref.norm()) < 8e-3, (N, K, D, I)  # bf16 output rounding: 2^-8
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and TRITON), reason="needs a CUDA GPU and triton")
def test_triton_kernel_equals_the_reference_on_the_gpu():
    """V2-Lite's expert shape (D 2048, I 1408, 64 experts, top-6), bf16, N = 1..64 decode rows."""
    from dsv3.fast.moe_triton import gathered_down_op
    g = torch.Generator("cuda").manual_seed(0)
    down = torch.randn(64, 2048, 1408, device="cuda", generator=g).bfloat16()
    op = gathered_down_op()
    for n in range(1, 65):
        h = torch.randn(n, 6, 1408, device="cuda", generator=g).bfloat16()
        idx = torch.randint(0, 64, (n, 6), device="cuda", generator=g)
        w = torch.rand(n, 6, device="cuda", generator=g)
        ref = gathered_down_reference(h.double(), idx, w.double(), down.double())
        got = op(h, idx, w, down).double()
        assert ((got - ref).norm() / ref.norm()).item() < 8e-3, n


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and TRITON), reason="needs a CUDA GPU and triton")
def test_compiled_moe_with_the_kernel_installed_equals_the_reference_on_the_gpu():
    """torch.compile(fullgraph) of the routed gather with the kernel installed (one custom op in the graph)."""
    from dsv3.fast.moe_triton import install
    moe = _moe(torch.bfloat16, hidden_size=256, moe_intermediate_size=320).cuda()
    x = torch.randn(4, 256, device="cuda").bfloat16()
    with torch.inference_mode():
        weights, indices, _ = moe.gate(x)
        ref = moe.routed_reference(x, weights, indices).double()
        stacks = moe._stacked_weights()
        assert install(moe) == 1
        torch._dynamo.reset()
        got = torch.compile(moe.routed_gather, fullgraph=True)(x, weights, indices, *stacks).double()
        eager = moe.routed_gather(x, weights, indices, *stacks).double()
    torch._dynamo.reset()
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
    assert ((eager - ref).norm() / ref.norm()).item() < 2e-2
