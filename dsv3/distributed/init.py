"""The process group: started from torchrun's environment, or absent (one process, the plain path).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process; `init` reads them
through torch.distributed's env:// rendezvous. With one process nothing is initialised and every helper of this
package is the identity, so single-device code never pays for a collective (DeepSeek's inference/generate.py does
the same: `if world_size > 1: dist.init_process_group(...)`).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init(backend: str | None = None, timeout_s: float = 600.0) -> int:
    """Join torchrun's process group; returns the world size (1 = not distributed, nothing initialised).

    backend: "nccl" or "gloo"; default nccl when CUDA is available, gloo otherwise. Each rank takes the GPU
    LOCAL_RANK. timeout_s: how long a collective waits for a missing rank before it raises (a dead peer makes the
    others fail, not hang).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend: expected 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world_size()


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
