"""The garbage collector kept out of the requests' way.

CPython's cyclic collector holds every thread while it walks the objects it tracks, and a
collection of the youngest generation walks every object made since the last one that is still
alive. In a storm those are hundreds of new connections and queued requests: 25,000 to 66,000
live objects made in the last seconds, walked in 20 to 60 ms with the event loop stopped
(bench/api_throughput.py, storm case, probed with gc callbacks). Reference counting frees
almost everything a request makes; the collector is there for the rare reference cycle.

So, once the API serves (`pace`, once per process):
- the youngest generation is collected after `YOUNG` objects rather than CPython's 700, so
  that within a tick reference counting frees what it can before a collection promotes it;
- what start-up made (modules, SDKs, the TLS context) is frozen: never walked again;
- every `TICK` seconds in which the event loop's thread worked more than `IDLE` of the time,
  the objects made since the last freeze that are still alive are frozen too (`gc.freeze`
  moves lists: it costs the same for 10 or 100,000 objects), so a collection walks at most
  about one tick's worth of objects;
- once the loop's thread has been idle for `QUIET` seconds, or at the latest `MAX_DEFER`
  seconds after the first freeze, everything is handed back and collected once
  (`gc.unfreeze`, `gc.collect`): the cycles that became garbage while frozen are reclaimed
  then, when little is waiting. Then start-up's objects are frozen again.
A frozen object that reference counting frees is freed at once as usual; only cycles wait.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
TICK = 0.1          # seconds between looks (a tick costs a clock read and, when busy, a freeze)
IDLE = 0.05         # the share of a tick the loop's thread may work and still be idle
QUIET = 10.0        # seconds idle before the deferred collection (it walks everything: tens of ms)
MAX_DEFER = 300.0   # seconds a cycle may wait at most under continuous load
YOUNG = 20_000      # the youngest generation's threshold (CPython: 700)

_task: asyncio.Task[None] | None = None
_running: Collector | None = None


class Collector:
    """The schedule; `tick` is called every TICK seconds on the event loop's thread (by
    `pace`'s task, or a test with its own clocks)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self._clock, self._cpu_clock = clock, cpu_clock
        self._at, self._cpu = clock(), cpu_clock()
        self.last_busy = self._at                   # the last tick the loop's thread was busy
        self.deferred_since: float | None = None    # first freeze since the last full collection
        self.freezes = self.collections = 0         # observable
        self.reclaimed = 0                          # objects the deferred collections freed
        self.longest = 0.0                          # seconds the longest of them took
        self.threshold_before = gc.get_threshold()  # restored by give_up

    def start(self) -> None:
        """Freeze what exists now (start-up's objects); the youngest generation's threshold."""
        self.threshold_before = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG, *self.threshold_before[1:])

    def give_up(self) -> None:
        """Back to CPython's own schedule: nothing frozen, its threshold again."""
        gc.unfreeze()
        gc.set_threshold(*self.threshold_before)

    def tick(self) -> None:
        now, cpu = self._clock(), self._cpu_clock()
        busy = (cpu - self._cpu) > IDLE * max(now - self._at, 1e-9)
        self._at, self._cpu = now, cpu
        if busy:  # what the last tick made and kept leaves the collector's sight
            self.last_busy = now
            gc.freeze()
            self.freezes += 1
            if self.deferred_since is None:
                self.deferred_since = now
        if self.deferred_since is not None and (now - self.last_busy >= QUIET
                                                or now - self.deferred_since >= MAX_DEFER):
            self.collect()

    def collect(self) -> None:
        """Everything back in the collector's sight, collected once, start-up's frozen again."""
        began = time.perf_counter()
        gc.unfreeze()
        self.reclaimed += gc.collect()
        gc.freeze()
        self.longest = max(self.longest, time.perf_counter() - began)
        self.collections += 1
        self.deferred_since = None


def pace() -> Collector:
    """Start the schedule on the running loop, once per process; the schedule running."""
    global _task, _running
    if _task is not None and not _task.done() and _running is not None:
        return _running
    collector = _running = Collector()
    collector.start()
    _task = asyncio.get_running_loop().create_task(schedule(collector), name="collector")
    return collector


async def schedule(collector: Collector, tick: float = TICK) -> None:
    """`collector.tick()` every `tick` seconds. If a tick fails (a bug of ours), the schedule
    says so once and hands the collector back to CPython's own schedule, unfrozen: what it froze
    must not stay out of the collector's sight for the life of the process."""
    while True:
        await asyncio.sleep(tick)
        try:
            collector.tick()
        except Exception:
            log.exception("the garbage collector's schedule failed; back to CPython's own (nothing frozen)")
            collector.give_up()
            return
