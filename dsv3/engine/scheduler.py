"""Who runs next: a bounded waiting queue, the running requests (one static cache row each), and at most one
request whose prompt is being prefilled in chunks.

Continuous batching (Orca, Yu et al. OSDI 2022; vLLM's scheduler): every engine step hands out a budget of prompt
tokens to prefill (first to the request already part-way through its prompt, then to newcomers while cache rows
are free), then decodes one token for every running request in a single batch. A prompt longer than what is left
of the budget is prefilled in chunks over several steps (chunked prefill, as vLLM and nano-vllm do for one
sequence at a time), so a long prompt never stalls the running requests for more than one budget's worth of
compute. Requests join and leave between any two tokens.

Newcomers whose whole prompt fits the budget are prefilled together in one padded forward over consecutive rows.
Running requests are kept packed in rows 0..R-1 (running[i] lives in row i), so a decode step works on the cache
view `cache.rows(slice(0, R))` without gathering; the request being prefilled in chunks sits in row R. When a
request leaves, the request in the last running row moves into its row and the prefilling one moves down to the
new row R; the engine copies their latents (`finish` says who moved from where).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..generation import StopStringStreamer
from .prefix_cache import Block
from .request import QueueFullError, RequestHandle


@dataclass(eq=False)
class Sequence:
    """Engine-side state of one request. tokens = prompt + generated; the newest token is not in the cache yet."""

    handle: RequestHandle
    tokens: list[int]
    streamer: StopStringStreamer
    generator: torch.Generator | None
    n_prompt: int = 0
    n_computed: int = 0  # prompt tokens whose latents are in the row (while prefilling)
    row: int = -1
    cached_tokens: int = 0  # prompt tokens whose latents came from the prefix cache
    held: dict[int, Block] = field(default_factory=dict)  # prefix-cache blocks this request references
    prompt_logprobs: list = field(default_factory=list)  # accumulated over prefill chunks, when asked for

    def __post_init__(self) -> None:
        self.n_prompt = len(self.tokens)

    @property
    def request(self):
        return self.handle.request

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt


class Scheduler:
    """The waiting queue (bounded by max_waiting), the packed running list and the one prefilling sequence
    (together at most max_batch rows)."""

    def __init__(self, max_batch: int, max_waiting: int) -> None:
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: Sequence | None = None
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (thread-safe); raises QueueFullError when max_waiting are already waiting.
        Cancelled ones do not count: they leave at the next step, but their room is free now."""
        with self.lock:
            if sum(not s.handle.cancelled.is_set() for s in self.waiting) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
            self.waiting.append(seq)
            self.wakeup.notify()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.prefilling)

    def wait_for_work(self, timeout: float) -> None:
        with self.lock:
            if not self.has_work():
                self.wakeup.wait(timeout)

    def take_cancelled_waiting(self) -> list[Sequence]:
        with self.lock:
            gone = [s for s in self.waiting if s.handle.cancelled.is_set()]
            for s in gone:
                self.waiting.remove(s)
        return gone

    def cancelled_in_rows(self) -> list[Sequence]:
        rows = self.running + ([self.prefilling] if self.prefilling else [])
        return [s for s in rows if s.handle.cancelled.is_set()]

    def peek_waiting(self) -> Sequence | None:
        """The next sequence to admit, if a row is free and no prompt is part-way through its prefill."""
        with self.lock:
            if self.waiting and self.prefilling is None and len(self.running) < self.max_batch:
                return self.waiting[0]
        return None

    def join(self, seq: Sequence) -> None:
        """Move the head of the waiting queue into the next row as a running sequence (its whole prompt is
        prefilled in this step, before anything else reads the row)."""
        self._pop(seq)
        seq.row = len(self.running)
        self.running.append(seq)

    def start(self, seq: Sequence) -> None:
        """Move the head of the waiting queue into the row after the running ones, to be prefilled in chunks."""
        self._pop(seq)
        seq.row = len(self.running)
        self.prefilling = seq

    def _pop(self, seq: Sequence) -> None:
        with self.lock:
            assert self.waiting[0] is seq
            self.waiting.popleft()

    def promote(self, seq: Sequence) -> None:
        """Its prompt is prefilled: it joins the running rows (it already sits in row R)."""
        assert self.prefilling is seq and seq.row == len(self.running)
        self.prefilling = None
        self.running.append(seq)

    def finish(self, seq: Sequence) -> list[tuple[Sequence, int]]:
        """Remove a sequence from the rows; return (sequence, its previous row) for each one that moved."""
        if seq is self.prefilling:
            self.prefilling = None
            return []
        moves = []
        last = self.running.pop()
        if last is not seq:
            moves.append((last, last.row))
            last.row = seq.row
            self.running[seq.row] = last
        if self.prefilling is not None:
            moves.append((self.prefilling, self.prefilling.row))
            self.prefilling.row = len(self.running)
        return moves

    def take_all(self) -> list[Sequence]:
        """Everything, running, prefilling and waiting (when the engine fails or stops)."""
        with self.lock:
            seqs = self.running + ([self.prefilling] if self.prefilling else []) + list(self.waiting)
            self.running, self.prefilling, self.waiting = [], None, deque()
        return seqs
