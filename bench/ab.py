"""This tree's generate speed against an earlier commit's, on the same machine in one run, paired rounds.

    python bench/ab.py --base d6d7e35 [--model DIR] [--compile] [--rounds 21] [--prompt-len 256] [--new-tokens 64]

Each tree runs in its own worker process (the base is `git archive`d into a temporary directory and put first on
the worker's PYTHONPATH), both load the same checkpoint in float32 with one thread, and the workers take turns,
the order alternating by round, so a change in machine load hits both alike. Prefill = generate of 1 new token;
decode ms/token = (t(N) - t(1)) / (N - 1). Each worker times its own CPU time (`time.thread_time`, steadier than
wall time on a shared machine) and wall time. The ratio is base time / this tree's time (> 1: this tree is faster),
the median of the per-round ratios with their range; the greedy tokens of the two trees are compared.

--per-step (eager): the trees take turns at every decode step instead of every generate call (each worker keeps its
own cache; the order flips every step), and each step is timed alone in thread CPU time. A step of the bundled model
is ~14 ms, so the machine's load moves both trees alike within a pair, and a few-percent change stands out of noise
that moves whole runs by 10-30% on a shared 2-core machine (docs/results.md, stop 32). It calls the model's forward
directly (`model(tokens [B, 1], cache, position)`), so it also times trees whose `generate` differs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(model_dir: str, prompt_len: int, compile: bool, new_tokens: int) -> None:
    """Serve timing requests on stdin/stdout: a line `k` -> generate k tokens, reply with times and tokens."""
    import torch

    import dsv3

    torch.set_num_threads(1)
    model = dsv3.load_pretrained(model_dir, dtype=torch.float32)
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dsv3.generate(model, prompt, 2, compile=compile)  # warm-up (and the one-off compile)
    print(json.dumps({"dsv3": dsv3.__file__}), flush=True)
    cache, tokens, pos = None, None, prompt_len
    for line in sys.stdin:
        if line.strip() in ("prefill", "step"):  # --per-step: one forward of the model, timed alone
            with torch.inference_mode():
                cpu = time.thread_time()
                if line.strip() == "prefill":
                    cache, pos = model.new_cache(1, prompt_len + new_tokens), prompt_len
                    tokens = model(prompt, cache)[:, -1].argmax(-1)
                else:
                    tokens, pos = model(tokens[:, None], cache, pos)[:, -1].argmax(-1), pos + 1
                cpu = time.thread_time() - cpu
            print(json.dumps({"cpu": cpu, "token": tokens.item()}), flush=True)
            continue
        k = int(line)
        cpu, wall = time.thread_time(), time.perf_counter()
        with torch.inference_mode():
            out = dsv3.generate(model, prompt, k, compile=compile)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        print(json.dumps({"cpu": cpu, "wall": wall, "tokens": out[0, prompt_len:].tolist()}), flush=True)


class Worker:
    """One tree's worker process."""

    def __init__(self, tree: Path, args) -> None:
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--prompt-len", str(args.prompt_len),
               "--new-tokens", str(args.new_tokens)]
        self.proc = subprocess.Popen(cmd + ["--compile"] * args.compile, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.file = json.loads(self.proc.stdout.readline())["dsv3"]

    def time(self, k: int | str) -> dict:
        """k tokens through generate, or "prefill" / "step" (--per-step): one forward of the model."""
        self.proc.stdin.write(f"{k}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


def per_step(workers: dict, rounds: int, n: int) -> dict:
    """{name: {"decode": [s per step...], "tokens": [...]}}: each round prefills both trees, then n decode steps in
    which the trees take turns, the order flipping every step; the i-th entries of the two lists are a pair."""
    res = {name: {"decode": [], "tokens": []} for name in workers}
    names = list(workers)
    for r in range(rounds):
        for name in names:
            res[name]["tokens"] = [workers[name].time("prefill")["token"]]
        for i in range(n):
            for name in (names if (r + i) % 2 == 0 else names[::-1]):
                step = workers[name].time("step")
                res[name]["decode"].append(step["cpu"])
                res[name]["tokens"].append(step["token"])
    return res


def paired(workers: dict, rounds: int, n: int) -> dict:
    """{name: {"prefill": [s...], "decode": [s/token...], "tokens": [...]}} per clock, rounds alternating order."""
    res = {name: {"cpu": {"prefill": [], "decode": []}, "wall": {"prefill": [], "decode": []}} for name in workers}
    names = list(workers)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            first, full = workers[name].time(1), workers[name].time(n)
            res[name]["tokens"] = full["tokens"]
            for clock in ("cpu", "wall"):
                res[name][clock]["prefill"].append(first[clock])
                res[name][clock]["decode"].append((full[clock] - first[clock]) / (n - 1))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="the earlier commit (any git revision)")
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--compile", action="store_true", help="time generate(..., compile=True) in both trees")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--per-step", action="store_true", help="eager: the trees take turns at every decode step, "
                   "each step timed alone (steadier for small changes; --rounds then counts prefills)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.per_step and args.compile:
        p.error("--per-step times the eager forward; drop --compile")
    if args.worker:
        return worker(args.model, args.prompt_len, args.compile, args.new_tokens)
    if not args.base:
        p.error("--base is required (a git revision to compare against)")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "dsv3"], capture_output=True)
    if archive.returncode:
        sys.exit(f"ab.py: --base {args.base}: {archive.stderr.decode().strip()}")
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        import dsv3

        args.model = str(dsv3.bundled_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        workers = {args.base: Worker(Path(tmp), args), "this tree": Worker(ROOT, args)}
        res = (per_step if args.per_step else paired)(workers, args.rounds, args.new_tokens)
        for w in workers.values():
            w.proc.stdin.close()
            w.proc.wait()
    if args.per_step:
        return report_steps(args, workers, res[args.base], res["this tree"])
    base, head = res[args.base], res["this tree"]
    mode = "compile=True" if args.compile else "eager"
    print(f"{mode}, {args.rounds} paired rounds, 1 thread, {args.prompt_len}-token prompt, {args.new_tokens} new "
          f"tokens, model {args.model}; same greedy tokens: {base['tokens'] == head['tokens']}")
    print("trees: " + ", ".join(f"{name} imports {w.file}" for name, w in workers.items()))
    print(f"{'median ms':24}{'base':>8}{'this tree':>11}{'ratio':>8}{'range':>14}")
    for clock in ("cpu", "wall"):
        for phase in ("prefill", "decode"):
            b, h = base[clock][phase], head[clock][phase]
            ratios = [x / y for x, y in zip(b, h)]
            label = f"{clock} {phase}" + (" (per token)" if phase == "decode" else "")
            print(f"{label:24}{statistics.median(b) * 1e3:8.2f}{statistics.median(h) * 1e3:11.2f}"
                  f"{statistics.median(ratios):8.3f}{min(ratios):8.3f}-{max(ratios):.3f}")


def report_steps(args, workers: dict, base: dict, head: dict) -> None:
    b, h = base["decode"], head["decode"]
    ratios = sorted(x / y for x, y in zip(b, h))
    print(f"eager, per step: {args.rounds} rounds of {args.new_tokens} decode steps taking turns, 1 thread, "
          f"{args.prompt_len}-token prompt, model {args.model}; same greedy tokens: {base['tokens'] == head['tokens']}")
    print("trees: " + ", ".join(f"{name} imports {w.file}" for name, w in workers.items()))
    print(f"decode ms/step, base {statistics.median(b) * 1e3:.2f} (mean {statistics.mean(b) * 1e3:.2f}), this tree "
          f"{statistics.median(h) * 1e3:.2f} (mean {statistics.mean(h) * 1e3:.2f}); ratio base/this: median of the "
          f"paired steps {statistics.median(ratios):.3f} (middle half {ratios[len(ratios) // 4]:.3f}-"
          f"{ratios[3 * len(ratios) // 4]:.3f}), of the means {statistics.mean(b) / statistics.mean(h):.3f}")


if __name__ == "__main__":
    main()
