"""Data parallelism for `dsv3 train` / `dsv3 finetune` under torchrun: every rank holds the whole model, takes
its equal share of each global batch, and the gradients, the logged loss parts and the routers' expert loads are
summed over ranks before the optimizer step and the bias update.

Why this reproduces one process exactly (up to summation order): the trainer scales each micro-batch's loss by
(its rows / the global batch size), so the per-rank gradients are the global batch's gradient split into W
partial sums; their sum is the single-process gradient, and clipping, AdamW and the bias update
(b_i += γ·sign(mean load - load_i), paper-V3 §2.1.2, on loads summed over all ranks) then run on identical
numbers on every rank, which keeps the replicas identical. This is DDP's all-reduce of gradients, done once per
step after the micro-batches (not bucketed during backward: the models trained here are small).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .init import active, rank, world_size

__all__ = ["barrier", "is_main", "rank", "say", "share", "sum_gradients", "sum_tensors", "world_size"]


def share(batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch [B, ...]: rows [r·B/W, (r+1)·B/W); ValueError naming batch_size when W
    does not divide B."""
    world = world_size()
    if batch.shape[0] % world:
        raise ValueError(f"batch_size={batch.shape[0]} is not divisible by the world size {world}: expected a "
                         "multiple of the number of processes")
    n = batch.shape[0] // world
    return batch[rank() * n:(rank() + 1) * n]


def sum_gradients(model: nn.Module) -> None:
    """Σ over ranks of every parameter's gradient, in place (nothing without a group). A parameter that no rank's
    share used (an expert no token chose) keeps grad None, as in one process, so AdamW skips it there too; one
    that only some ranks used gets zeros on the others before the sum."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(used)
    params = [p for p, n in zip(params, used.tolist()) if n]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    for p, piece in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(piece.view_as(p.grad))


def sum_tensors(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: Σ over ranks of the tensor}: the step's loss parts or expert loads (same keys on every rank)."""
    if not active() or not values:
        return values
    names = sorted(values)
    flat = torch.cat([torch.as_tensor(values[n], dtype=torch.float32).flatten() for n in names])
    dist.all_reduce(flat)
    sizes = [torch.as_tensor(values[n]).numel() for n in names]
    return {n: piece.view_as(torch.as_tensor(values[n])).to(torch.as_tensor(values[n]).dtype)
            for n, piece in zip(names, flat.split(sizes))}


def is_main() -> bool:
    """Rank 0, the one that writes checkpoints, logs and prints (also True without a process group)."""
    return rank() == 0


def say(*args, **kwargs) -> None:
    """print, on rank 0 only (every rank of a data-parallel run would print the same line)."""
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint); nothing without a group."""
    if active():
        dist.barrier()
