"""The collector's schedule (service/collector.py), on injected clocks: survivors frozen
while busy, a cycle that became garbage meanwhile reclaimed once the loop is idle or at the
latest after MAX_DEFER, start-up's objects frozen again after each deferred collection."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from spyrus_hsm.service import collector as col


class Clock:
    """Wall time `t` and the loop thread's CPU time `used` (the test moves both)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.used = 0.0

    def __call__(self) -> float:
        return self.t

    def cpu(self) -> float:
        return self.used


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def collector() -> Iterator[tuple[col.Collector, Clock]]:
    threshold = gc.get_threshold()
    clock = Clock()
    c = col.Collector(clock, clock.cpu)
    c.start()
    yield c, clock
    gc.unfreeze()
    gc.set_threshold(*threshold)


def busy(clock: Clock, n: int = 5_000) -> list[object]:
    """A tick in which the loop works half the time and makes `n` objects that stay alive
    (what a storm's connections and queued requests are)."""
    clock.t += col.TICK
    clock.used += col.TICK / 2
    return [[] for _ in range(n)]


def cycle() -> weakref.ref[Node]:
    """A reference cycle that only the collector can free; a weak reference to watch it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_start_freezes_what_exists_and_raises_the_youngest_threshold(collector: tuple[col.Collector, Clock]) -> None:
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == col.YOUNG


def test_a_busy_tick_freezes_its_survivors_and_an_idle_loop_collects_what_waited(
        collector: tuple[col.Collector, Clock]) -> None:
    c, clock = collector
    watched = cycle()
    kept = busy(clock)
    frozen = gc.get_freeze_count()
    c.tick()
    assert c.freezes == 1 and gc.get_freeze_count() >= frozen + len(kept), "a busy tick freezes what survived it"
    del kept
    gc.collect()  # a collection now walks nothing frozen: the cycle made before the freeze waits
    assert watched() is not None
    clock.t += col.TICK
    c.tick()      # idle, but for less than QUIET
    assert c.freezes == 1 and c.collections == 0 and watched() is not None
    clock.t += col.QUIET
    c.tick()
    assert c.collections == 1 and watched() is None, "the deferred collection reclaims the cycle"
    assert c.reclaimed >= 2
    assert gc.get_freeze_count() > 0, "start-up's objects are frozen again"
    clock.t += col.QUIET
    c.tick()
    assert c.collections == 1, "nothing deferred: no further collection"


def test_an_idle_loop_freezes_nothing(collector: tuple[col.Collector, Clock]) -> None:
    c, clock = collector
    for _ in range(10):
        clock.t += col.TICK
        clock.used += col.TICK * col.IDLE / 2
        c.tick()
    assert c.freezes == 0 and c.collections == 0


def test_under_continuous_load_the_cycle_waits_at_most_max_defer(collector: tuple[col.Collector, Clock]) -> None:
    c, clock = collector
    watched = cycle()
    kept = busy(clock)
    c.tick()
    first = clock.t
    while not c.collections and clock.t - first < 2 * col.MAX_DEFER:
        kept = busy(clock, 10)  # never idle
        c.tick()
        if clock.t - first < col.MAX_DEFER:
            assert watched() is not None
    assert c.collections == 1 and watched() is None
    assert col.MAX_DEFER <= clock.t - first < col.MAX_DEFER + 2 * col.TICK
    del kept


def test_a_failing_tick_hands_the_collector_back_unfrozen_and_says_so_once(
        collector: tuple[col.Collector, Clock], caplog: pytest.LogCaptureFixture) -> None:
    """Before: the schedule's task died with the exception, unseen, and what it had frozen stayed
    frozen for the life of the process."""
    import asyncio

    c, clock = collector
    keep = busy(clock)
    c.tick()
    assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == col.YOUNG
    c.threshold_before = (700, 10, 10)  # CPython's (another test's collector may have set YOUNG already)

    def broken() -> float:
        raise RuntimeError("clock gone")

    c._clock = broken  # a bug in the schedule
    asyncio.run(asyncio.wait_for(col.schedule(c, tick=0.0), 5))  # returns: the schedule ended
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == c.threshold_before  # the threshold it found at its start again
    failures = [r for r in caplog.records if "schedule failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    del keep
