"""`dsv3 serve` under torchrun: rank 0 runs the HTTP server and the scheduler, the other ranks follow its steps.

Every rank holds its share of the model and an engine of its own (same config, same cache layout). Before each
engine step rank 0 broadcasts a `StepPlan`: the requests admitted since the last step (in order, each with the
sampling seed rank 0 fixed for it) and the requests cancelled as of now. Each rank applies the plan to its own
scheduler and runs `Engine.step()`: since scheduling, prefix caching, row moves and sampling depend only on the
queue and on the (all-gathered, identical) logits, every rank takes the same decisions and calls the same forwards,
whose collectives pair up. Only rank 0's request handles reach clients.

Liveness: while idle, rank 0 broadcasts an empty plan every HEARTBEAT_S seconds. A rank that died closes its
sockets, so rank 0's next broadcast or collective fails; rank 0 then prints one line naming the failure and exits
with status 1 (the engine thread ends the process: there is no recovering a split model without that rank). A
follower whose rank 0 vanished exits the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch.distributed as dist

from ..engine import Engine
from ..engine.request import QueueFullError, Request, RequestHandle
from ..engine.scheduler import Scheduler, Sequence
from .init import active, rank

HEARTBEAT_S = 1.0
log = logging.getLogger("dsv3.server")


@dataclass
class StepPlan:
    """What rank 0 sends before a step. new: (rank 0's handle id, request) in arrival order; cancelled: rank 0's
    handle ids cancelled as of this step; step: run Engine.step() (False: a heartbeat); stop: the server is done."""
    new: list[tuple[int, Request]] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    step: bool = True
    stop: bool = False


def broadcast(plan: StepPlan | None) -> StepPlan:
    """rank 0's plan on every rank (the argument is ignored elsewhere)."""
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class PlannedScheduler(Scheduler):
    """A Scheduler whose queue changes only at plan boundaries: `add` parks new sequences until `admit_pending`,
    and cancellation is what the current plan says (a flag set between two steps takes effect at the next plan),
    so the schedulers of all ranks see the same queue at every step. limit=False: no max_waiting check (a
    follower adds what rank 0 already accepted)."""

    def __init__(self, max_batch: int, max_waiting: int, limit: bool = True) -> None:
        super().__init__(max_batch, max_waiting)
        self.pending: list[Sequence] = []
        self.cancelled: set[RequestHandle] = set()
        self.limit = limit

    def add(self, seq: Sequence) -> None:
        with self.lock:
            if self.limit and sum(not s.handle.cancelled.is_set()
                                  for s in [*self.waiting, *self.pending]) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
            self.pending.append(seq)
            self.wakeup.notify()

    def has_work(self) -> bool:
        return bool(self.pending) or super().has_work()

    def admit_pending(self) -> list[Sequence]:
        """Move the parked sequences into the waiting queue; returns them in order."""
        with self.lock:
            new, self.pending = self.pending, []
            self.waiting.extend(new)
        return new

    def live(self) -> list[Sequence]:
        with self.lock:
            return [*self.waiting, *self.running, *([self.prefilling] if self.prefilling else [])]

    def take_cancelled_waiting(self) -> list[Sequence]:
        with self.lock:
            gone = [s for s in self.waiting if s.handle in self.cancelled]
            for s in gone:
                self.waiting.remove(s)
        return gone

    def cancelled_in_rows(self) -> list[Sequence]:
        rows = self.running + ([self.prefilling] if self.prefilling else [])
        return [s for s in rows if s.handle in self.cancelled]


class LeaderEngine(Engine):
    """Rank 0's engine: its steps are preceded by the broadcast plan; idle, it sends heartbeats; a failed
    collective ends the process (status 1, one line on stderr)."""

    def __init__(self, model, tokenizer, config=None) -> None:
        super().__init__(model, tokenizer, config)
        self.scheduler = PlannedScheduler(self.config.max_batch, self.config.max_waiting)

    def submit(self, request: Request) -> RequestHandle:
        """Engine.submit with a seed fixed here when the request has none: every rank samples with it."""
        if request.params.seed is None:
            params = dataclasses.replace(request.params, seed=random.randrange(2**63))
            request = dataclasses.replace(request, params=params)
        return super().submit(request)

    def step(self) -> None:
        new = self.scheduler.admit_pending()
        self.scheduler.cancelled = {s.handle for s in self.scheduler.live() if s.handle.cancelled.is_set()}
        broadcast(StepPlan([(s.handle.id, s.request) for s in new], [h.id for h in self.scheduler.cancelled]))
        super().step()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stopping.is_set():
            self.scheduler.wait_for_work(timeout=0.05)
            if self._stopping.is_set():
                break
            try:
                if self.scheduler.has_work():
                    self.step()
                    last = time.monotonic()
                elif time.monotonic() - last >= HEARTBEAT_S:
                    broadcast(StepPlan(step=False))
                    last = time.monotonic()
            except Exception as error:  # a rank is gone (or a step failed on one): the split model cannot go on
                fatal(f"dsv3 serve: rank 0 stops: a step or collective across the ranks failed "
                      f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); is another rank dead?")

    def shutdown(self) -> None:
        super().shutdown()
        try:
            broadcast(StepPlan(step=False, stop=True))
        except Exception as error:  # the others are gone already: nothing to tell them
            log.warning("could not tell the other ranks to stop: %s", error)


class FollowerEngine(Engine):
    """A rank > 0's engine: `follow()` applies rank 0's plans and steps with it until told to stop."""

    def __init__(self, model, tokenizer, config=None) -> None:
        super().__init__(model, tokenizer, config)
        self.scheduler = PlannedScheduler(self.config.max_batch, self.config.max_waiting, limit=False)
        self.handles: dict[int, RequestHandle] = {}  # rank 0's handle id -> this rank's handle

    def apply(self, plan: StepPlan) -> None:
        for leader_id, request in plan.new:
            self.handles[leader_id] = self.submit(request)
        self.scheduler.admit_pending()
        self.scheduler.cancelled = {self.handles[i] for i in plan.cancelled if i in self.handles}

    def follow(self) -> int:
        """Loop on rank 0's plans; 0 when rank 0 says stop, 1 (with a message) when rank 0 is gone."""
        while True:
            try:
                plan = broadcast(None)
                if plan.stop:
                    return 0
                if plan.step:
                    self.apply(plan)
                    self.step()
            except Exception as error:
                print(f"dsv3 serve: rank {rank()} stops: rank 0 is gone or a step failed ({type(error).__name__}: "
                      f"{' '.join(str(error).split())[:300]})", file=sys.stderr, flush=True)
                return 1
            live = {s.handle for s in self.scheduler.live()}
            self.handles = {i: h for i, h in self.handles.items() if h in live}  # finished ones are dropped


def engine_class() -> type[Engine]:
    """The engine for this process: Engine alone, LeaderEngine on rank 0 and FollowerEngine elsewhere under a
    process group."""
    if not active():
        return Engine
    return LeaderEngine if rank() == 0 else FollowerEngine


def fatal(message: str) -> None:
    """Print `message` and end the process with status 1 from any thread."""
    log.critical(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(1)
