"""Trainer state on disk: atomic checkpoints (hub-layout model + optimizer + trainer_state.json), RNG states, and
the metrics log (metrics.jsonl / metrics.csv). Used by dsv3/train.py.

Optimizer state is written with torch.save but holds only tensors, numbers, lists and dicts, so it loads with
`torch.load(weights_only=True)` (nothing arbitrary is unpickled); RNG states go into the JSON as base64 / lists.
"""

from __future__ import annotations

import base64
import csv
import json
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .atomic import directory
from .checkpoint import load_pretrained, save_pretrained
from .model import Transformer


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python RNG states as JSON (base64 bytes / lists), for trainer_state.json."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": b64(torch.get_rng_state()),
            "cuda": [b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state: dict) -> None:
    """Inverse of rng_state: after it, every generator continues exactly where the checkpointed run was."""
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def save_checkpoint(target: Path, model: Transformer, optimizer: torch.optim.Optimizer, state: dict,
                    extra_files: Sequence[str | Path] = ()) -> None:
    """Write the whole checkpoint into a temp dir beside `target`, then rename it: never a partial checkpoint."""
    with directory(target) as tmp:
        save_pretrained(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)  # not copy2: a new file gets the umask's mode, not the source's


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first."""
    found = [p for p in Path(out_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def refuse_earlier_run(out_dir: str | Path, flag: str, resume: str, checkpoint_glob: str = "checkpoint-*",
                       outputs: Sequence[str] = ("metrics.jsonl",)) -> None:
    """A run that does not resume must not write into a directory holding an earlier run's results: its retention
    would delete the new checkpoints (or replace the old ones of the same number) and its logs would be overwritten.

    Raises FileExistsError naming out_dir when it holds an entry matching checkpoint_glob or a non-empty file of
    `outputs`; a missing or empty directory (or one with only other files, e.g. a token cache) passes.
    flag: the option naming the directory ("--out"); resume: how to continue instead ("--resume", "resume=True").
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    found = sorted((p.name for p in out_dir.glob(checkpoint_glob)), key=lambda n: (len(n), n))  # checkpoint-9 < -10
    logs = [n for n in outputs if (out_dir / n).is_file() and (out_dir / n).stat().st_size]
    if found:
        raise FileExistsError(f"{flag} {out_dir} already holds an earlier run's checkpoints ({', '.join(found[-3:])}"
                              f"{', ...' if len(found) > 3 else ''}): pass {resume} to continue it, or choose a new "
                              "directory")
    if logs:
        raise FileExistsError(f"{flag} {out_dir} already holds an earlier run's {' and '.join(logs)} (and no "
                              "checkpoint to resume from): choose a new directory, or remove those files")


def load_checkpoint(path: Path, model: Transformer, optimizer: torch.optim.Optimizer, train_config: dict) -> dict:
    """Restore weights, optimizer and RNG states in place; returns trainer_state.json.

    The data order depends on seq_len, batch_size and seed, so a resume that changes them is refused.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    for key in ("seq_len", "batch_size", "seed"):
        if state["train_config"][key] != train_config[key]:
            raise ValueError(f"--resume: {path} was trained with {key}={state['train_config'][key]}, "
                             f"the config now says {train_config[key]}")
    weights = load_pretrained(path, dtype=next(model.parameters()).dtype, parallel=False)
    model.load_state_dict(weights.state_dict())
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    set_rng_state(state["rng"])
    return state


class MetricsLog:
    """Appends one record per log step to metrics.jsonl (everything) and metrics.csv (scalars)."""

    def __init__(self, out_dir: Path, layer_names: list[str], resume_step: int | None) -> None:
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.fields = ["step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s",
                       "indexer_loss", "maxvio", *[f"maxvio/{n}" for n in layer_names], "eval_loss"]
        kept = []
        if resume_step is not None and self.jsonl.is_file():  # drop records past the checkpoint we resume from
            kept = [r for r in map(json.loads, self.jsonl.read_text().splitlines()) if r["step"] <= resume_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def append(self, record: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        with self.csv.open("a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(record)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT / SIGTERM after saving a checkpoint; the message says where and how to resume."""


class StopOnSignal:
    """Within `with StopOnSignal() as stop:`, SIGINT and SIGTERM only set `stop.received` (the signal's name), so
    the training loop can finish its step and save; the first signal restores the previous handlers, so a second
    one acts at once (Ctrl-C raises KeyboardInterrupt). Outside the main thread signals cannot be caught: no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopOnSignal":
        self.received: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
