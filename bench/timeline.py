"""Where a GPU call's time goes, from a torch.profiler Chrome trace: kernels per call, the summed kernel time, the
idle gaps between consecutive kernels, and the kernels that take the most time (bench/decode.py --profile writes the
traces and appends this table to each .txt; docs/results.md quotes it).

    python bench/timeline.py DIR/decode_b1.json --calls 5

A gap is the time from one kernel's end to the next one's start. Gaps shorter than --max-gap (default 50 us) are
counted as part of a call (inside a CUDA graph they are the launch latency between kernels, ~0.4 us on an H200);
longer ones are taken as the host's time between calls and left out.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def kernels(trace: Path) -> list[dict]:
    """The device-side events (kernels, copies, memsets) of a Chrome trace, in start order."""
    events = json.loads(Path(trace).read_text())["traceEvents"]
    found = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(found, key=lambda e: e["ts"])


def summary(trace: Path, calls: int, top: int = 25, max_gap_us: float = 50.0, name_width: int = 100) -> str:
    """A text table for a trace that recorded `calls` identical calls (times in microseconds per call)."""
    ev = kernels(trace)
    if not ev:
        return f"{trace}: no device kernels in the trace (a CPU run?)\n"
    busy = sum(e["dur"] for e in ev)
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(ev, ev[1:])]
    inside = [g for g in gaps if g < max_gap_us]
    lines = [f"{len(ev) / calls:.0f} kernels per call, {busy / calls:.1f} us of kernel time, "
             f"{sum(inside) / calls:.1f} us of gaps under {max_gap_us:g} us between them "
             f"(median gap {sorted(inside)[len(inside) // 2] if inside else 0:.2f} us)",
             f"{'us/call':>9} {'share':>6} {'n/call':>6} {'us each':>8}  kernel"]
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in ev:
        by_name[e["name"]].append(e["dur"])
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    for name, durs in ranked[:top]:
        total = sum(durs)
        lines.append(f"{total / calls:9.1f} {total / busy:6.1%} {len(durs) / calls:6.1f} {total / len(durs):8.2f}"
                     f"  {name[:name_width]}")
    rest = ranked[top:]
    if rest:
        total = sum(sum(d) for _, d in rest)
        lines.append(f"{total / calls:9.1f} {total / busy:6.1%} {sum(len(d) for _, d in rest) / calls:6.1f} "
                     f"{'':>8}  ({len(rest)} other kernels)")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path, help="a Chrome trace written by torch.profiler (export_chrome_trace)")
    p.add_argument("--calls", type=int, default=1, help="how many identical calls the trace recorded")
    p.add_argument("--top", type=int, default=25, help="kernels to list (by total time)")
    p.add_argument("--max-gap", type=float, default=50.0, help="longest gap (us) counted as inside a call")
    args = p.parse_args()
    if args.calls < 1 or args.top < 1 or args.max_gap <= 0:
        p.error("--calls and --top must be >= 1 and --max-gap > 0")
    print(summary(args.trace, args.calls, args.top, args.max_gap), end="")


if __name__ == "__main__":
    main()
