"""dsv3/fast/triton_moe.py: the routed down projection's Triton kernel against its reference.

On a CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is defined, so in a fresh
process): the indexing, masks at ragged edges (D and I not multiples of the blocks) and the weighted sum over K are
checked where CI runs. On a GPU (marked `gpu`, skipped without CUDA) the compiled kernel is checked at decode batch
sizes on the V2-Lite expert shape, and inside a torch.compile'd graph as `fused_gather` calls it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRETED = textwrap.dedent("""
    import torch
    from dsv3.fast.moe import fused_gather
    from dsv3.fast.triton_moe import routed_down, routed_down_reference
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for N, K, E, D, I in ((1, 4, 8, 100, 72), (3, 2, 5, 33, 200), (2, 6, 6, 16, 128)):
            h, down = torch.randn(N, K, I).to(dtype), torch.randn(E, D, I).to(dtype)
            weights, indices = torch.rand(N, K), torch.randint(0, E, (N, K))
            torch.testing.assert_close(routed_down(h, weights, indices, down),
                                       routed_down_reference(h, weights, indices, down), rtol=tol, atol=tol)
        x, gate_up = torch.randn(3, 40).to(dtype), (torch.randn(5, 2 * 24, 40) / 6).to(dtype)
        down, weights, indices = (torch.randn(5, 40, 24) / 5).to(dtype), torch.rand(3, 2), torch.randint(0, 5, (3, 2))
        torch.testing.assert_close(fused_gather(x, weights, indices, gate_up, down, down_kernel=routed_down),
                                   fused_gather(x, weights, indices, gate_up, down), rtol=2 * tol, atol=2 * tol)
    try:
        routed_down(torch.zeros(1, 2, 8), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), torch.zeros(3, 4, 9))
    except ValueError as e:
        assert "[N, K, I], [N, K], [E, D, I]" in str(e), e
    else:
        raise AssertionError("a down stack of another width was accepted")
    print("ok")
""")


def test_kernel_equals_the_reference_in_the_interpreter():
    import dsv3
    path = os.pathsep.join(filter(None, (str(Path(dsv3.__file__).parents[1]), os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)  # the dsv3 this process tests
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n", [1, 8, 64])
def test_kernel_equals_the_reference_on_a_gpu(n):
    """V2-Lite's routed experts (64 of [2048, 1408], top-6) in bf16 at decode batch sizes."""
    from dsv3.fast.triton_moe import routed_down, routed_down_reference
    g = torch.Generator("cuda").manual_seed(n)
    down = torch.randn(64, 2048, 1408, device="cuda", generator=g).div(40).bfloat16()
    h = torch.randn(n, 6, 1408, device="cuda", generator=g).bfloat16()
    weights = torch.rand(n, 6, device="cuda", generator=g)
    indices = torch.randint(0, 64, (n, 6), device="cuda", generator=g)
    torch.testing.assert_close(routed_down(h, weights, indices, down), routed_down_reference(h, weights, indices, down),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@needs_cuda
def test_compiled_graph_runs_the_kernel_with_the_eager_result():
    """fused_gather with the kernel inside torch.compile (as CompiledMoE calls it) against eager fused_gather."""
    from dsv3.fast.moe import fused_gather
    from dsv3.fast.triton_moe import routed_down
    g = torch.Generator("cuda").manual_seed(0)
    gate_up = torch.randn(16, 2 * 256, 512, device="cuda", generator=g).div(20).bfloat16()
    down = torch.randn(16, 512, 256, device="cuda", generator=g).div(16).bfloat16()
    x = torch.randn(4, 512, device="cuda", generator=g).bfloat16()
    weights = torch.rand(4, 3, device="cuda", generator=g)
    indices = torch.randint(0, 16, (4, 3), device="cuda", generator=g)
    args = (x, weights, indices, gate_up, down)
    compiled = torch.compile(lambda *a: fused_gather(*a, down_kernel=routed_down), fullgraph=True)
    torch.testing.assert_close(compiled(*args), fused_gather(*args), rtol=2e-2, atol=2e-2)
