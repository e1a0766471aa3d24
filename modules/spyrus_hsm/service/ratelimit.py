"""Per-principal token buckets: `rate` requests per second on average, bursts up to `burst`."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_PRINCIPALS = 10_000  # least recently seen buckets are forgotten beyond this (memory bound)


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # name -> (tokens, at)

    def check(self, principal: str) -> int | None:
        """None if the request may go ahead (one token taken), else seconds to wait."""
        if self.rate <= 0:
            return None
        now = self.clock()
        tokens, at = self._buckets.pop(principal, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = None
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = max(1, math.ceil((1.0 - tokens) / self.rate))
        self._buckets[principal] = (tokens, now)
        if len(self._buckets) > MAX_PRINCIPALS:
            self._buckets.popitem(last=False)
        return wait
