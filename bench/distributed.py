"""Tensor + expert parallel decoding at W = 1 and 2 (dsv3/distributed/, docs/distributed.md): tokens/s and the
all-reduce time per decode step.

    python bench/distributed.py                       # CPU, gloo, the bundled model in fp32
    python bench/distributed.py --backend nccl        # one GPU per rank (W = 2 needs two GPUs)

Each world size runs in its own processes (forked; one thread each on CPU). A run: prefill a batch of prompts,
then `--steps` greedy decode steps through the parallel model with a latent cache (the generation loop's eager
step), timed after one warm-up step. The all-reduce time is measured apart, on the same ranks: the step's
collectives (one per layer's attention and FFN, one for the embedding, all of [B, 1, D]; plus the logits'
all-gather of [B, 1, V/W]) run alone `--steps` times. With --backend nccl and W = 1 the model itself calls no
collective (world size 1 is the plain path); the collectives' line then shows what a one-rank NCCL group costs. Prints one line per W and the W=2 / W=1 tokens/s ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsv3
from dsv3.distributed import init, parallelize


def decode(model, batch: int, prompt: int, steps: int, device) -> float:
    """Seconds for `steps` greedy decode steps of `batch` rows after a `prompt`-token prefill (one warm-up)."""
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch, prompt + steps + 1)
    with torch.no_grad():
        tok = model(ids.to(device), cache, logits_to_keep=1).argmax(-1)
        tok = model(tok, cache, start_pos=prompt).argmax(-1)[:, -1:]  # warm-up step
        sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            tok = model(tok, cache, start_pos=prompt + 1 + i).argmax(-1)[:, -1:]
        sync(device)
    return time.perf_counter() - t0


def collectives(model, batch: int, steps: int, device, world: int) -> float:
    """Seconds for `steps` rounds of one decode step's collectives alone (called directly, so a one-rank group
    pays them too)."""
    c = model.config
    x = torch.randn(batch, 1, c.hidden_size, device=device, dtype=model.lm_head.weight.dtype)
    logits = torch.randn(batch, 1, c.vocab_size // world, device=device, dtype=x.dtype)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        for _ in range(2 * c.num_hidden_layers + 1):
            dist.all_reduce(x)
        dist.all_gather([torch.empty_like(logits) for _ in range(world)], logits)
    sync(device)
    return time.perf_counter() - t0


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_main(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    if world > 1:
        init(args.backend)
    elif args.backend == "nccl":  # a one-rank group: the model calls no collective, the timing below shows their cost
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    model = parallelize(dsv3.load_pretrained(dsv3.bundled_model_path(), dtype=getattr(torch, args.dtype),
                                             device=device, parallel=False))
    t = decode(model, args.batch, args.prompt, args.steps, device)
    c = collectives(model, args.batch, args.steps, device, world) if dist.is_initialized() else 0.0
    if rank == 0:
        results[world] = (t, c)
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    args = p.parse_args()
    results = mp.Manager().dict()
    for world in args.worlds:
        mp.start_processes(rank_main, args=(world, free_port(), args, results), nprocs=world,
                           start_method="spawn" if args.backend == "nccl" else "fork")
        t, c = results[world]
        tok_s = args.batch * args.steps / t
        print(f"W={world} {args.backend} {args.dtype} batch {args.batch}: {tok_s:7.1f} tokens/s, "
              f"{1e3 * t / args.steps:6.2f} ms/step, collectives alone {1e3 * c / args.steps:6.2f} ms/step",
              flush=True)
    if 1 in results and 2 in results:
        r1, r2 = results[1][0], results[2][0]
        print(f"tokens/s ratio W=2 / W=1: {r1 / r2:.2f}")


if __name__ == "__main__":
    main()
