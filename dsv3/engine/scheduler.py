"""Who runs next: a bounded waiting queue, and the running requests, one static cache row each.

Continuous batching (Orca, Yu et al. OSDI 2022; vLLM's scheduler): every engine step first admits waiting requests
while cache rows are free and the step's prefill token budget lasts, then decodes one token for every running
request in a single batch. Requests join and leave between any two tokens.

Running requests are kept packed in rows 0..R-1 (running[i] lives in row i), so a decode step works on the cache
view `cache.rows(slice(0, R))` without gathering. When a request leaves, the request in the last row moves into its
row; the engine copies that row's latents (its `move_row`).
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
    row: int = -1
    cached_tokens: int = 0  # prompt tokens whose latents came from the prefix cache
    held: dict[int, Block] = field(default_factory=dict)  # prefix-cache blocks this request references

    def __post_init__(self) -> None:
        self.n_prompt = len(self.tokens)

    @property
    def request(self):
        return self.handle.request

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt


class Scheduler:
    """The waiting queue (bounded by max_waiting) and the packed running list (at most max_batch rows)."""

    def __init__(self, max_batch: int, max_waiting: int) -> None:
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (thread-safe); raises QueueFullError when max_waiting are already waiting."""
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
            self.waiting.append(seq)
            self.wakeup.notify()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

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

    def cancelled_running(self) -> list[Sequence]:
        return [s for s in self.running if s.handle.cancelled.is_set()]

    def peek_waiting(self) -> Sequence | None:
        """The next sequence to admit, if a row is free."""
        with self.lock:
            if self.waiting and len(self.running) < self.max_batch:
                return self.waiting[0]
        return None

    def start(self, seq: Sequence) -> None:
        """Move the head of the waiting queue into the next free row."""
        with self.lock:
            assert self.waiting[0] is seq
            self.waiting.popleft()
        seq.row = len(self.running)
        self.running.append(seq)

    def finish(self, seq: Sequence) -> Sequence | None:
        """Remove a running sequence; return the one moved from the last row into its row (None if no move)."""
        last = self.running.pop()
        if last is seq:
            return None
        last.row = seq.row
        self.running[seq.row] = last
        return last

    def take_all(self) -> list[Sequence]:
        """Everything, running and waiting (when the engine fails or stops)."""
        with self.lock:
            seqs = self.running + list(self.waiting)
            self.running, self.waiting = [], deque()
        return seqs
