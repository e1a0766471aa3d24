"""Token buckets: per principal (`RateLimiter`: `rate` requests per second on average, bursts up
to `burst`), and per source address for requests that fail authentication (`FailureLimiter`)."""

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


MAX_SOURCES = 10_000  # source addresses whose failed requests are remembered (least recently seen forgotten)


class FailureLimiter:
    """Per source address, a token bucket that only requests failing authentication take from:
    `burst` of them at once, then `rate` a second. While a source's bucket is empty, `wait` tells
    how long it must wait, and its requests are refused before their credentials are looked at
    (so a flood of bad tokens or certificates costs no digest comparison, no signature check).
    A bucket that has filled up again is forgotten, and at most `max_sources` are kept (the least
    recently charged are forgotten first: they start full again). Addresses are counted exactly,
    like the TLS listener's per-source cap: leaves behind one NAT share a bucket."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)

    def _tokens(self, source: str, now: float) -> float | None:
        """The source's tokens now (None: a full bucket, not remembered)."""
        entry = self._buckets.get(source)
        if entry is None:
            return None
        tokens = entry[0] + (now - entry[1]) * self.rate
        if tokens >= self.burst:
            del self._buckets[source]
            return None
        return tokens

    def wait(self, source: str | None) -> int | None:
        """None if a request from `source` may be authenticated, else seconds to wait. Takes nothing."""
        if self.rate <= 0 or source is None:
            return None
        tokens = self._tokens(source, self.clock())
        if tokens is None or tokens >= 1.0:
            return None
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def failed(self, source: str | None) -> None:
        """A request from `source` failed authentication: one token taken."""
        if self.rate <= 0 or source is None:
            return
        now = self.clock()
        tokens = self._tokens(source, now)
        tokens = float(self.burst) if tokens is None else tokens
        self._buckets.pop(source, None)
        self._buckets[source] = (max(0.0, tokens - 1.0), now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def source_address(peer: object) -> str | None:
    """The address of a transport's peername ((host, port, ...) for TCP), or None."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else None
