"""One deadline for stopping the module. edgeAgent kills a module 10 s after SIGTERM, so the
steps of a stop (events, the edgeHub client, listeners, the audit log, the hub connection, the
HSM pool, telemetry) share one budget: each step is waited for at most what is left of it (and
at most its own cap), a step that overruns is abandoned and logged, and the steps after it still
run with what is left. Blocking steps run on daemon threads, which never hold up the exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .threads import spawn

log = logging.getLogger(__name__)
STOP_SECONDS = 8.0  # of edgeAgent's 10 s: the rest is the interpreter's own exit
GRACE = 0.1         # a step is told this much less than it is waited for, so it can return in time


class Shutdown:
    def __init__(self, seconds: float = STOP_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.seconds = clock, seconds
        self.deadline = clock() + seconds
        self.abandoned: list[str] = []  # steps that did not finish in their share, in order

    def remaining(self, cap: float | None = None) -> float:
        """Seconds left of the budget (at most `cap`)."""
        left = max(0.0, self.deadline - self.clock())
        return left if cap is None else min(cap, left)

    async def call(self, what: str, fn: Callable[[float], object], cap: float | None = None) -> bool:
        """`fn(seconds)` on a daemon thread, told how long it has and waited for that long;
        False if it did not return in time (it is left to finish on its own)."""
        budget = self.remaining(cap)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            try:
                fn(max(0.0, budget - GRACE))
            except Exception as exc:  # a failed step does not stop the others
                log.warning("stopping: %s failed: %s", what, exc)
            finally:
                try:
                    loop.call_soon_threadsafe(_finish, done)
                except RuntimeError:  # the loop is gone: nobody waits any more
                    pass

        spawn(run, f"stop-{what}")
        return await self._within(what, done, budget)

    async def wait(self, what: str, step: Awaitable[object], cap: float | None = None) -> bool:
        """Await `step` for at most what is left (and `cap`); False if it was cut off."""
        budget = self.remaining(cap)
        try:
            return await self._within(what, step, budget)
        except Exception as exc:
            log.warning("stopping: %s failed: %s", what, exc)
            return True

    async def _within(self, what: str, step: Awaitable[object], budget: float) -> bool:
        try:
            await asyncio.wait_for(step, budget)
        except TimeoutError:
            self.abandoned.append(what)
            log.warning("stopping: %s did not finish within %.1f s (of the %g s shutdown budget); "
                        "abandoned", what, budget, self.seconds)
            return False
        return True


def _finish(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
