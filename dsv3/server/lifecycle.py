"""Readiness and graceful drain: what an orchestrator (Kubernetes, docker compose) expects of a server process.

A pod's life as the kubelet sees it: the process starts, `/health` (liveness) answers as soon as it listens, and
`/ready` (readiness) answers 200 only once a first generation has gone through the engine (the warm-up: the first
step allocates and, on a GPU, loads kernels). On termination the kubelet sends SIGTERM, waits
`terminationGracePeriodSeconds`, then SIGKILL. On SIGTERM `DrainingServer` keeps listening but refuses new API
requests (503 + Retry-After) and answers `/ready` 503 so the endpoint leaves the Service, lets the requests in flight
(streams included) finish for up to `grace` seconds, aborts those still running then (a stream ends with an error
event), shuts uvicorn down and exits 0. A second SIGTERM or a SIGINT during the drain ends it (uvicorn's shutdown,
cutting what still runs a second later); SIGINT alone is uvicorn's Ctrl-C, and a second Ctrl-C (uvicorn's force quit)
still stops the engine through the app's lifespan. docs/deploy.md §5.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

import uvicorn

from ..engine import Request
from ..sampling import SamplingParams

log = logging.getLogger("dsv3.server")


@dataclass
class Lifecycle:
    """The serving state of `engine`. ready: the warm-up generation has finished; draining: SIGTERM arrived;
    inflight: API (/v1) requests being answered, streams until their last chunk. Read and written on the event loop
    only."""

    engine: object
    ready: bool = False
    draining: bool = False
    inflight: int = 0

    @property
    def status(self) -> str:
        return "draining" if self.draining else "ready" if self.ready else "warming up"

    async def warm_up(self) -> None:
        """One token generated from a one-token prompt through the running engine, then ready. A failure is
        logged and leaves the server unready: the orchestrator keeps traffic away and shows why in the log."""
        handle = self.engine.submit(Request(prompt_ids=[0], params=SamplingParams(max_new_tokens=1)))
        reason = error = None
        async for delta in handle:
            reason, error = delta.finish_reason or reason, delta.error or error
        if reason in ("stop", "length"):
            self.ready = True
            log.info("warm-up generation done: ready")
        else:
            log.error("warm-up generation ended with %s (%s): /ready stays 503", reason, error)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains (module docstring) instead of stopping at once. `grace`: seconds
    the requests in flight get to finish; keep it below the orchestrator's grace period."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace: float) -> None:
        super().__init__(config)
        self.lifecycle, self.grace, self.deadline = lifecycle, grace, None

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.lifecycle.draining:
            # not recorded in uvicorn's captured signals: those are re-raised after shutdown (exit 143, not 0)
            self.lifecycle.draining = True
            self.deadline = time.monotonic() + self.grace
            self.config.timeout_graceful_shutdown = 1  # once the drain ends, what is left is cut after a second
            log.info("SIGTERM: draining %d request(s) for up to %gs; new requests get 503",
                     self.lifecycle.inflight, self.grace)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.deadline is not None and not self.should_exit:
            if self.lifecycle.inflight == 0 or time.monotonic() >= self.deadline:
                if self.lifecycle.inflight:  # end them as aborted: streams close with an error event
                    log.warning("drain: grace period over, %d request(s) aborted", self.lifecycle.inflight)
                    self.lifecycle.engine.shutdown()
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets=sockets)
        done = getattr(self.lifespan, "shutdown_event", None)  # None: no lifespan (uvicorn's lifespan="off")
        if self.force_exit and done is not None and not done.is_set():
            # A second Ctrl-C: uvicorn skips the app's lifespan shutdown, leaving the engine thread running and the
            # lifespan task to be cancelled as the event loop closes, which starlette logs as a traceback. Ending
            # it is quick: the engine stops (requests still running end as aborted, a stream with an error event)
            # and their handlers get a second to send that before the loop closes.
            await self.lifespan.shutdown()
            if self.server_state.tasks:
                await asyncio.wait(list(self.server_state.tasks), timeout=1)
