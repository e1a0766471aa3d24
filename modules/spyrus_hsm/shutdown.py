"""One deadline for stopping the module. edgeAgent kills a module 10 s after SIGTERM, so the
steps of a stop (events, the edgeHub client, listeners, the audit log, the hub connection, the
HSM pool, telemetry) share one budget: each step is waited for at most what is left of it (and
at most its own cap), a step that overruns is abandoned and logged, and the steps after it still
run with what is left. Blocking steps run on a lane (threads.py): daemon threads, which never
hold up the exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .threads import Lane

log = logging.getLogger(__name__)
STOP_SECONDS = 8.0  # of edgeAgent's 10 s: the rest is the interpreter's own exit
GRACE = 0.1         # a step is told this much less than it is waited for, so it can return in time
STEPS = 16          # steps of a stop that may run at once (each hung one holds its place)


class Shutdown:
    def __init__(self, seconds: float = STOP_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.seconds = clock, seconds
        self.deadline = clock() + seconds
        self.abandoned: list[str] = []  # steps that did not finish in their share, in order
        self._lane = Lane("stop", width=STEPS)  # a hung step keeps its place; the others have theirs

    def remaining(self, cap: float | None = None) -> float:
        """Seconds left of the budget (at most `cap`)."""
        left = max(0.0, self.deadline - self.clock())
        return left if cap is None else min(cap, left)

    async def call(self, what: str, fn: Callable[[float], object], cap: float | None = None) -> bool:
        """`fn(seconds)` on the stop's lane, told how long it has and waited for that long;
        False if it did not return in time (it is left to finish on its own, on a daemon thread)."""
        budget = self.remaining(cap)
        try:
            await self._lane.run(lambda: fn(max(0.0, budget - GRACE)), budget, f"stopping {what}")
        except TimeoutError:
            self._abandon(what, budget)
            return False
        except Exception as exc:  # a failed step does not stop the others
            log.warning("stopping: %s failed: %s", what, exc)
        return True

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
            self._abandon(what, budget)
            return False
        return True

    def _abandon(self, what: str, budget: float) -> None:
        self.abandoned.append(what)
        log.warning("stopping: %s did not finish within %.1f s (of the %g s shutdown budget); "
                    "abandoned", what, budget, self.seconds)
