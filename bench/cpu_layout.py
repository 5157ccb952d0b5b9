"""Which storage order a CPU's BLAS reads fastest for products of a few rows: the grid behind dsv3/fast/layout.py.

    python bench/cpu_layout.py [--sizes 64,128,256,512,1024,2048,4096] [--rows 1] [--dtype float32] [--threads 1]

For each weight W: [N, K] (N, K over --sizes) it times `F.linear(x [rows, K], W)` with W stored by rows
(nn.Linear's order) and by columns (the same values, strides (1, N)), and prints time(rows) / time(columns): above 1
the columns are faster. Weights are cold, as in a decode step: each call reads another of several copies, ~48 MB in
all, beyond the last-level caches of the CPUs measured so far. A `*` marks the shapes that
`dsv3.fast.layout.prefers_columns` stores by columns. Each cell is the best of 3 rounds, the two orders taking turns.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from dsv3.fast.layout import prefers_columns


def seconds_per_call(x: torch.Tensor, weights: list[torch.Tensor], calls: int) -> float:
    for w in weights:  # warm-up: first-touch page faults and the library's dispatch
        F.linear(x, w)
    start = time.perf_counter()
    for _ in range(calls):
        for w in weights:
            F.linear(x, w)
    return (time.perf_counter() - start) / (calls * len(weights))


def ratio(n: int, k: int, rows: int, dtype: torch.dtype, footprint: float = 48e6) -> float:
    """time by rows / time by columns for W: [n, k], the best of 3 turns each."""
    copies = max(2, int(footprint / (n * k * dtype.itemsize)))
    by_rows = [torch.randn(n, k).to(dtype) for _ in range(copies)]
    by_columns = [w.t().contiguous().t() for w in by_rows]
    x = torch.randn(rows, k).to(dtype)
    calls = max(3, int(2e7 / (n * k * copies)))
    times = {"rows": [], "columns": []}
    for _ in range(3):
        times["rows"].append(seconds_per_call(x, by_rows, calls))
        times["columns"].append(seconds_per_call(x, by_columns, calls))
    return min(times["rows"]) / min(times["columns"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64,128,256,512,1024,2048,4096", help="comma-separated N and K values")
    p.add_argument("--rows", type=int, default=1, help="rows of x (1: a decode step at batch 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1 or args.rows < 1 or args.threads < 1:
        p.error("--sizes, --rows and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.dtype}, x: [{args.rows}, K]; time by rows / time by columns (> 1: columns faster; * stored by "
          "columns by dsv3)")
    print("N \\ K " + "".join(f"{k:>8}" for k in sizes))
    for n in sizes:
        cells = []
        for k in sizes:
            mark = "*" if prefers_columns(torch.empty(n, k, dtype=dtype)) else " "
            cells.append(f"{ratio(n, k, args.rows, dtype):>7.2f}{mark}")
        print(f"{n:>5} " + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
