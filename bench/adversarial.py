"""/health latency while a server refuses oversized requests (issue 17's acceptance: p99 < 100 ms for 30 s).

    python bench/adversarial.py                  # the bundled model, 30 s of flood
    python bench/adversarial.py --seconds 10 --model DIR

`dsv3 serve` runs as a subprocess with its default limits (bench/serve.py's `server`). Three threads send, in a loop,
a chat request with a 10 MB message (refused with 413 from its Content-Length), a completions request with 10,000
prompts and one with a 3.9 MB prompt under the body cap (both refused with 400 before anything is tokenised),
while this thread polls /health every 10 ms.
Prints /health's p50/p99/max latency with the flood, and without it for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from serve import NAME, _cpu, model_dir, server


def health_latencies(url: str, seconds: float) -> list[float]:
    latencies = []
    with httpx.Client(timeout=30) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            begin = time.perf_counter()
            http.get(url + "/health").raise_for_status()
            latencies.append(time.perf_counter() - begin)
            time.sleep(0.01)
    return latencies


def flood(base_url: str, content: bytes, stop: threading.Event, statuses: list) -> None:
    with httpx.Client(timeout=120, headers={"content-type": "application/json"}) as http:
        path = "/chat/completions" if b'"messages"' in content[:64] else "/completions"
        while not stop.is_set():
            try:
                statuses.append(http.post(base_url + path, content=content).status_code)
            except httpx.HTTPError:  # the server may close the connection before reading all of a refused body
                statuses.append("closed")


def summary(name: str, latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    return (f"{name}: {len(ms)} polls, p50 {statistics.median(ms):.1f} ms, "
            f"p99 {statistics.quantiles(ms, n=100)[98]:.1f} ms, max {ms[-1]:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    bodies = [json.dumps({"messages": [{"role": "user", "content": "a b " * (10 << 18)}], "model": NAME}).encode(),
              json.dumps({"model": NAME, "prompt": ["hi"] * 10_000, "max_tokens": 1}).encode(),
              json.dumps({"model": NAME, "prompt": "a b " * 975_000, "max_tokens": 1}).encode()]
    with tempfile.TemporaryDirectory() as scratch:
        path, label = model_dir(args.model, Path(scratch))
        with server(path) as base_url:
            url = base_url.removesuffix("/v1")
            quiet = health_latencies(url, min(5.0, args.seconds))
            stop, statuses = threading.Event(), []
            threads = [threading.Thread(target=flood, args=(base_url, b, stop, statuses)) for b in bodies]
            for t in threads:
                t.start()
            try:
                loaded = health_latencies(url, args.seconds)
            finally:
                stop.set()
                for t in threads:
                    t.join()
    print(f"{label}; {_cpu()}")
    print(summary("/health, idle", quiet))
    print(summary(f"/health, flood of {len(statuses)} refused requests "
                  f"({', '.join(f'{s}: {statuses.count(s)}' for s in sorted(set(statuses), key=str))})", loaded))


if __name__ == "__main__":
    main()
