"""Command-line options that several `dsv3` commands share (serve, chat, train, finetune, eval, quantize):
`--device`, and `--model DIR|HUB_ID [--revision R]`. Kept below the commands that use them, so that no command
module imports the top-level dispatcher (dsv3/cli.py).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from .hub import CheckpointError, resolve_model


def device(value: str) -> str:
    """`--device` of every subcommand: "auto" (the default) is cuda when a GPU is there, else cpu; a device that
    this machine does not have is an error (argparse reports it as one line naming --device)."""
    import torch

    with warnings.catch_warnings():  # CUDA builds warn about a missing driver while probing; the answer is enough
        warnings.simplefilter("ignore")
        cuda = torch.cuda.is_available()
        count = torch.cuda.device_count() if cuda else 0
    if value == "auto":
        return "cuda" if cuda else "cpu"
    try:
        chosen = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1, auto)") from None
    if chosen.type == "cuda" and (not cuda or (chosen.index or 0) >= count):
        raise argparse.ArgumentTypeError(f"{value}: no such CUDA device here ({count} found); use --device cpu")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value}: MPS is not available here; use --device cpu")
    return str(chosen)


REVISION_HELP = "hub branch, tag or commit of --model (default: main)"


def model_path(name: str, revision: str | None = None) -> Path:
    """`--model DIR|HUB_ID [--revision R]` -> a local checkpoint directory (dsv3.hub.resolve_model); one that
    cannot be had ends the command with one line naming --model."""
    try:
        return resolve_model(name, revision)
    except CheckpointError as error:
        raise SystemExit(f"--model {error}") from None
