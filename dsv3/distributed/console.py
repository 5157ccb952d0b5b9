"""Interactive commands under torchrun (`dsv3 chat`): rank 0 owns the terminal, every rank runs the same turns.

A parallel model needs all ranks in every forward, so each rank must generate the same tokens: rank 0 reads the
user's line and broadcasts it, sampling uses one seed chosen by rank 0, and the other ranks write their copy of
the answer nowhere.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import TextIO

import torch.distributed as dist

from .init import active, rank


def shared_read(read: Callable[[str], str]) -> Callable[[str], str]:
    """`read` on rank 0, its line (or end of input: EOFError) broadcast to every rank; `read` itself alone."""
    if not active():
        return read

    def read_everywhere(prompt: str) -> str:
        box: list = [None]
        if rank() == 0:
            try:
                box[0] = read(prompt)
            except EOFError:
                box[0] = EOFError
        dist.broadcast_object_list(box, src=0)
        if box[0] is EOFError:
            raise EOFError
        return box[0]
    return read_everywhere


def shared_seed(seed: int | None) -> int | None:
    """The sampling seed every rank uses: `seed`, or one rank 0 draws when none is given under a process group
    (without it each rank would sample its own tokens and the ranks' forwards would diverge)."""
    if seed is not None or not active():
        return seed
    box = [random.randrange(2**31) if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_output(out: TextIO) -> TextIO:
    """`out` on rank 0, the null device on the others."""
    return out if rank() == 0 else open(os.devnull, "w")
