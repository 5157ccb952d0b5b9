"""Serving benchmark: `dsv3 serve` under 1, 8 and 32 concurrent streaming clients, and the prefix cache's effect on
time-to-first-token in a multi-turn chat with a long shared system prompt.

    python bench/serve.py                      # the bundled model (a tiny random one if it is not built yet)
    python bench/serve.py --model DIR --max-tokens 64
    python bench/serve.py --compile            # the servers' decode step through torch.compile
    python bench/serve.py --shape v2-lite --clients 1 8 32 128   # GPU: a random V2-Lite-shaped bf16 model
    python bench/serve.py --shape v2-lite --eager                # ... with the eager decode step

The server runs as a subprocess (`python -m dsv3.cli serve`, as users start it); the clients are streaming httpx
requests in this process, with the SSE parsed by hand so that the clients take little of the CPU the server needs
(the openai SDK builds a pydantic object per chunk; the tests cover the SDK).
Throughput = completion tokens of all requests / wall time of the phase (requests/s likewise); the batching gain is
tokens/s at N clients over tokens/s at 1. TTFT is measured to the first chunk with content, the inter-token latency
(ITL) between consecutive content chunks of one stream (each chunk is one token here: ignore_eos, no stop strings).
`--shape v2-lite` serves bench/decode.py's DeepSeek-V2-Lite-shaped random model (6.9B parameters, bf16) with the
bundled tokenizer's vocabulary instead of V2-Lite's 102400 (random weights pick any id, and an id the tokenizer
lacks decodes to no text, which would hide the token from TTFT and ITL): a smaller LM head, ~3% of the weights.
The prefix-cache comparison starts two servers, one with `--prefix-cache-mb 0`, and sends both the same
conversations (each turn resends the whole history, as chat clients do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

import dsv3

NAME = "bench"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def model_dir(arg: str | None, scratch: Path, shape: str | None = None) -> tuple[Path, str]:
    if arg:
        return Path(arg), arg
    bundled = Path(dsv3.__file__).parent / "bundled"
    if shape == "v2-lite":
        sys.path.insert(0, str(Path(__file__).parent))
        from decode import V2_LITE

        vocab = dsv3.Tokenizer.from_pretrained(bundled).vocab_size
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = dsv3.Transformer(dsv3.ModelConfig(**dict(V2_LITE, vocab_size=vocab))).to(torch.bfloat16)
        dsv3.save_pretrained(model, scratch)
        del model
        torch.cuda.empty_cache()  # the server, a subprocess, loads it again
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(bundled / name, scratch / name)
        return scratch, f"random V2-Lite-shaped bf16 model, vocabulary {vocab}"
    try:
        return dsv3.bundled_model_path(), "bundled model"
    except FileNotFoundError:
        torch.manual_seed(0)
        model = dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192))
        dsv3.save_pretrained(model, scratch)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(bundled / name, scratch / name)
        return scratch, "tiny random model (bundled model not built yet)"


@contextmanager
def server(path: Path, *flags: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dsv3.cli", "serve", "--model", str(path), "--served-model-name", NAME,
           "--port", str(port), "--rate-limit", "0", "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        # compiling at startup (--compile, and by default on a GPU) takes minutes; loading 14 GB takes a while too
        deadline = time.monotonic() + (120 if "--eager" in flags or not torch.cuda.is_available() and
                                       "--compile" not in flags else 900)
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {' '.join(cmd)}")
            time.sleep(0.2)
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def one_stream(client: httpx.AsyncClient, messages, max_tokens: int) -> dict:
    """Stream one chat completion; return its TTFT, latency, completion and cached tokens, and its text.
    SSE is parsed by hand (json per `data:` line) to keep the client's share of the 2 cores small."""
    body = {"model": NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    ttft, usage, text, arrivals = None, None, [], []
    async with client.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
                ttft = ttft if ttft is not None else arrivals[0] - start
                text.append(chunk["choices"][0]["delta"]["content"])
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"ttft": ttft, "latency": time.perf_counter() - start, "tokens": usage["completion_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"], "prompt": usage["prompt_tokens"],
            "text": "".join(text), "itl": [b - a for a, b in zip(arrivals, arrivals[1:])]}


def _client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=600, limits=httpx.Limits(max_connections=256))


async def throughput(base_url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    client = _client(base_url)

    async def worker(w):
        out = []
        for r in range(per_client):
            prompt = f"Client {w}, request {r}: tell me about the history of the {['cat', 'dog', 'owl'][r % 3]}."
            out.append(await one_stream(client, [{"role": "user", "content": prompt}], max_tokens))
        return out

    await one_stream(client, [{"role": "user", "content": "warm up"}], 4)
    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
    wall = time.perf_counter() - start
    await client.aclose()
    return {"clients": clients, "requests": len(results), "tok_s": sum(r["tokens"] for r in results) / wall,
            "req_s": len(results) / wall, "ttft": [r["ttft"] for r in results],
            "latency": [r["latency"] for r in results], "itl": [gap for r in results for gap in r["itl"]]}


def system_prompt(path: Path, tokens: int) -> str:
    """A system prompt of about `tokens` tokens under the model's tokenizer."""
    tokenizer = dsv3.Tokenizer.from_pretrained(path)
    rules = []
    while len(tokenizer.encode(" ".join(rules))) < tokens:
        rules.append(f"Rule {len(rules)}: answer politely about animals and plants.")
    return " ".join(rules)


async def multi_turn(base_url: str, system: str, conversations: int, turns: int, max_tokens: int) -> list:
    """Sequential multi-turn chats sharing one long system prompt; returns every turn's measurements. One more
    conversation runs first, uncounted: it brings the server's kernels to these prompt lengths (on a GPU the first
    long prefills pay for cuBLAS/SDPA algorithm choices) and, with the prefix cache on, caches the system prompt, as a
    server that has been answering for a while holds it."""
    client = _client(base_url)
    out = []
    for c in range(-1, conversations):
        messages = [{"role": "system", "content": system}]
        for t in range(turns):
            messages.append({"role": "user", "content": f"Conversation {c}, question {t}: what about the owl?"})
            result = await one_stream(client, messages, max_tokens)
            messages.append({"role": "assistant", "content": result["text"]})
            if c >= 0:
                out.append(result)
    await client.aclose()
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: bundled model, else a tiny random one)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request in the throughput phase")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--shape", choices=["v2-lite"], help="serve a random model of this shape (GPU) instead")
    parser.add_argument("--model-out", help="with --shape: write the random model here (kept, for --model in a "
                        "later run) rather than in a temporary directory")
    parser.add_argument("--compile-max-batch", type=int, help="the servers' --compile-max-batch (fewer graphs to "
                        "compile and capture at startup)")
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput phase (>= clients)")
    parser.add_argument("--system-tokens", type=int, default=1500,
                        help="length of the shared system prompt (at most half the model's context)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (the clients share the CPU)")
    parser.add_argument("--conversations", type=int, default=3, help="multi-turn chats per prefix-cache server "
                        "(0 skips the prefix-cache phase)")
    parser.add_argument("--turns", type=int, default=4)
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--compile", action="store_true", help="start the servers with --compile (the compiled "
                      "decode step; compiling at startup is not counted). The servers' default: on a GPU only")
    form.add_argument("--eager", action="store_true", help="start the servers with --eager (also on a GPU)")
    args = parser.parse_args()
    for name in ("max_tokens", "requests", "system_tokens", "threads", "turns"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.conversations < 0 or min(args.clients) < 1:
        parser.error("--conversations must be >= 0 and every --clients value >= 1")

    with tempfile.TemporaryDirectory() as scratch:
        if args.model_out:
            Path(args.model_out).mkdir(parents=True, exist_ok=True)
        path, what = model_dir(args.model, Path(args.model_out or scratch), args.shape)
        context = json.loads((path / "config.json").read_text())["max_position_embeddings"]
        sizes = ["--max-batch", str(max(args.clients)), "--max-seq-len", str(context), "--threads", str(args.threads)]
        sizes += ["--compile"] if args.compile else ["--eager"] if args.eager else []
        sizes += ["--compile-max-batch", str(args.compile_max_batch)] if args.compile_max_batch else []
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{_cpu()}, {os.cpu_count()} cores"
        print(f"model: {what} ({path}); {card}, torch {torch.__version__}; server flags: {' '.join(sizes)}")
        with server(path, *sizes) as url:
            rows = [asyncio.run(throughput(url, c, max(1, args.requests // c) if c > 1 else max(4, args.requests // 8),
                                           args.max_tokens)) for c in args.clients]
        base = rows[0]["tok_s"]
        print(f"\nThroughput ({args.max_tokens} tokens per request, streaming, temperature 0)")
        print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>8} {'vs 1':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8} {'lat p50':>8} {'lat p99':>8}")
        for r in rows:
            print(f"{r['clients']:>7} {r['requests']:>8} {r['req_s']:>7.2f} {r['tok_s']:>8.1f} {r['tok_s'] / base:>5.2f}x "
                  f"{pct(r['ttft'], .5):>8.3f}s {pct(r['ttft'], .99):>8.3f}s {1e3 * pct(r['itl'], .5):>6.1f}ms "
                  f"{1e3 * pct(r['itl'], .99):>6.1f}ms {pct(r['latency'], .5):>7.3f}s {pct(r['latency'], .99):>7.3f}s")

        if not args.conversations:
            return
        chats, system = {}, system_prompt(path, min(args.system_tokens, context // 2))
        for label, flags in (("prefix cache off", ["--prefix-cache-mb", "0"]), ("prefix cache on", [])):
            with server(path, *sizes, *flags) as url:
                chats[label] = asyncio.run(multi_turn(url, system, args.conversations, args.turns, 8))
        print(f"\nMulti-turn chat: {args.conversations} conversations x {args.turns} turns, shared system prompt "
              f"of {chats['prefix cache on'][0]['prompt']} tokens (first turn)")
        print(f"{'':>17} {'TTFT mean':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'cached/prompt':>14}")
        for label, results in chats.items():
            ttft = [r["ttft"] for r in results]
            cached = sum(r["cached"] for r in results) / sum(r["prompt"] for r in results)
            print(f"{label:>17} {statistics.mean(ttft):>9.3f}s {pct(ttft, .5):>8.3f}s {pct(ttft, .99):>8.3f}s "
                  f"{cached:>13.0%}")
        off = statistics.mean(r["ttft"] for r in chats["prefix cache off"])
        on = statistics.mean(r["ttft"] for r in chats["prefix cache on"])
        print(f"TTFT change with the prefix cache: {100 * (on - off) / off:+.0f}%")


if __name__ == "__main__":
    main()
