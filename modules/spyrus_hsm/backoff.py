"""The package's one back-off: how long to wait before trying again after failures in a row.

Exponential from `initial`, doubled after each failure, capped at `cap`; optionally jittered, so
devices of a fleet that failed together do not retry together; never sooner than a server's
Retry-After. `delay(n)` is the pure rule; `next()` and `reset()` keep the count for a caller that
only says "failed again" or "it worked".
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Jitter = Literal["none", "full", "upper-half"]
_system = secrets.SystemRandom()


@dataclass
class Backoff:
    initial: float
    cap: float
    # none: the exponential itself; full: uniformly in [0, it]; upper-half: in [it/2, it].
    jitter: Jitter = "none"
    # A server's Retry-After is honoured up to this many seconds (None: whatever it says).
    retry_after_cap: float | None = None
    # uniform(a, b): injected by tests; the system's random source otherwise.
    uniform: Callable[[float, float], float] = field(default=_system.uniform, repr=False, compare=False)
    failures: int = field(default=0, init=False, compare=False)

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after `failures` failures in a row (1: the first): initial * 2**(n-1),
        capped, jittered; with a Retry-After, not before it. Under full jitter the wait after a
        Retry-After is spread over one `initial` past it (the exponential's own draw could be
        anything down to zero, which would bring back together the clients told the same time)."""
        ceiling = min(self.cap, self.initial * 2 ** min(max(0, failures - 1), 62))
        if self.jitter == "full":
            wait = self.uniform(0.0, ceiling)
        elif self.jitter == "upper-half":
            wait = self.uniform(ceiling / 2, ceiling)
        else:
            wait = ceiling
        if retry_after is None:
            return wait
        floor = min(max(retry_after, 0.0), math.inf if self.retry_after_cap is None else self.retry_after_cap)
        if self.jitter == "full":
            return floor + self.uniform(0.0, self.initial)
        return max(wait, floor)

    def next(self, retry_after: float | None = None) -> float:
        """Count one more failure; the wait before the next attempt."""
        self.failures += 1
        return self.delay(self.failures, retry_after)

    def reset(self) -> None:
        """It worked: the next failure waits `initial` again."""
        self.failures = 0
