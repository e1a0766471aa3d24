"""At most a few requests start their work in one event-loop iteration.

The event loop runs every callback that is ready in one iteration before it looks at its timers
and sockets again. When hundreds of leaves send a request at the same moment (all coming back
after the same Retry-After, or all reconnecting after an outage), each request's first step
(authentication, policy, cache, the audit record, the answer) would run in the same iteration,
and everything else, a hit on an open connection or the HSM's answers, would wait for all of
them. A `Pacer` lets `per_iteration` requests through per iteration, in order of arrival; the
others wait for the next iterations. Below that rate it costs one counter and no waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Pacer:
    def __init__(self, per_iteration: int) -> None:
        self.per_iteration = per_iteration
        self._budget = per_iteration
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._refill_due = False
        self.delayed = 0  # requests that waited for a later iteration (observable)

    async def turn(self) -> None:
        """Return when this request may start its work."""
        self._schedule_refill()
        if self._budget > 0 and not self._waiting:
            self._budget -= 1
            return
        self.delayed += 1
        ready = asyncio.get_running_loop().create_future()
        self._waiting.append(ready)
        try:
            await ready
        except asyncio.CancelledError:
            if ready.done() and not ready.cancelled():
                self._budget += 1  # its turn came as it was cancelled: give it to the next one
            raise

    def _schedule_refill(self) -> None:
        if not self._refill_due:
            self._refill_due = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:  # runs in the next iteration
        self._refill_due = False
        self._budget = self.per_iteration
        while self._budget > 0 and self._waiting:
            ready = self._waiting.popleft()
            if not ready.done():
                ready.set_result(None)
                self._budget -= 1
        if self._waiting:
            self._schedule_refill()
