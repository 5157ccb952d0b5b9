"""The GPU's own ceilings and the kernel choices behind dsv3's GPU paths, in one short run (bench/gpu.sh runs it
before bench/decode.py; about 20 s on an H200).

    python bench/gpu_ceilings.py [--quick]      # --quick: the two ceilings and the routed down projection

- copy bandwidth (2 GiB device-to-device, bytes read + written) and bf16 matmul rate (8192^3): the figures
  bench/decode.py's floors take (--bandwidth, --peak);
- SDPA at MLA's prefill shape (16 heads, 2048 tokens, q/k head dim 192, v 128, causal) with each backend, and
  with v padded to 192 (what the CPU path does for its flash kernel);
- one V2-Lite-shaped MoE layer, eager, routed through gathered weights and through grouped matmuls at N tokens
  (MoE.few_pairs and the MoE path tables are set from this);
- the routed experts' down projection at decode (V2-Lite: 64 experts of [2048, 1408], top-6, bf16) as inductor
  compiles `gathered_down` (what a compiled decode step runs) against the Triton kernel `routed_down`
  (dsv3/fast/triton_moe.py), in µs and in TB/s of the distinct experts' weights read: the figure that decides
  whether `CompiledMoE.routed_down_kernel` becomes the default (issue 21 measured 1.4 TB/s for inductor's).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dsv3
from decode import V2_LITE


def median_ms(fn, reps: int = 20) -> float:
    """Median of `reps` CUDA-event timings of fn(), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def main() -> None:
    quick = "--quick" in sys.argv[1:]  # the two ceilings and the routed down projection
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_ceilings.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a))
    print(f"copy 2 GiB: {ms:.3f} ms = {2 * a.numel() / ms / 1e9:.2f} TB/s (read + write)", flush=True)
    del a, b
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    y = torch.randn_like(x)
    print(f"bf16 matmul 8192^3: {2 * 8192**3 / median_ms(lambda: x @ y) / 1e9:.0f} TFLOP/s", flush=True)
    del x, y
    if not quick:
        attention_backends()
        moe_paths()
    routed_down_kernels()


def attention_backends() -> None:
    H, T = 16, 2048
    q = torch.randn(1, H, T, 192, dtype=torch.bfloat16, device="cuda")
    k = torch.randn_like(q)
    v = torch.randn(1, H, T, 128, dtype=torch.bfloat16, device="cuda")
    flops = 2 * H * T * (T + 1) / 2 * (192 + 128)  # causal: the useful half of QK^T and PV
    for name, backend, value in [("default", None, v), ("default, v padded to 192", None, F.pad(v, (0, 64))),
                                 ("flash, v padded to 192", SDPBackend.FLASH_ATTENTION, F.pad(v, (0, 64))),
                                 ("cudnn", SDPBackend.CUDNN_ATTENTION, v),
                                 ("efficient", SDPBackend.EFFICIENT_ATTENTION, v)]:
        def attend(backend=backend, value=value):
            with sdpa_kernel(backend) if backend else nullcontext():
                return F.scaled_dot_product_attention(q, k, value, is_causal=True)
        try:
            ms = median_ms(attend)
            print(f"SDPA {name}: {ms * 1e3:.0f} us = {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        except RuntimeError as error:
            print(f"SDPA {name}: {str(error).splitlines()[0]}", flush=True)


def moe_paths() -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        moe = dsv3.moe.MoE(dsv3.ModelConfig(**V2_LITE)).to(torch.bfloat16).eval()
    with torch.inference_mode():
        for n in (1, 2, 4, 8, 16, 64, 2048):
            tokens = torch.randn(n, moe.gate.weight.shape[1], dtype=torch.bfloat16, device="cuda")
            weights, indices, _ = moe.gate(tokens)
            times = {}
            for path in ("gather", "grouped"):
                moe.path = path
                times[path] = median_ms(lambda: moe.routed(tokens, weights, indices)) * 1e3
            print(f"MoE layer, eager, N={n} ({n * moe.top_k} pairs): gathered weights {times['gather']:.0f} us, "
                  f"grouped matmuls {times['grouped']:.0f} us", flush=True)


def routed_down_kernels() -> None:
    from dsv3.fast.moe import gathered_down
    from dsv3.fast.triton_moe import routed_down

    E, D, I, K = 64, 2048, 1408, 6
    g = torch.Generator("cuda").manual_seed(0)
    down = torch.randn(E, D, I, device="cuda", generator=g).div(40).bfloat16()
    inductor = torch.compile(gathered_down, options={"coordinate_descent_tuning": True})  # as the decode step's
    with torch.inference_mode():
        for n in (1, 8, 64):
            h = torch.randn(n, K, I, device="cuda", generator=g).bfloat16()
            weights = torch.rand(n, K, device="cuda", generator=g)
            indices = torch.randint(0, E, (n, K), device="cuda", generator=g)
            read = indices.unique().numel() * D * I * down.element_size()
            ref = gathered_down(h, weights, indices, down).float()
            cells = []
            for name, fn in (("inductor", inductor), ("triton kernel", routed_down)):
                us = median_ms(lambda fn=fn: fn(h, weights, indices, down), reps=50) * 1e3
                err = ((fn(h, weights, indices, down).float() - ref).norm() / ref.norm()).item()
                cells.append(f"{name} {us:.1f} us = {read / us / 1e6:.2f} TB/s (rel. error {err:.1e})")
            print(f"routed down projection, N={n} ({read / 1e6:.1f} MB of experts): " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
