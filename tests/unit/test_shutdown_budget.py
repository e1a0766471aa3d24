"""The steps of a stop share one budget: each is told, and waited for, what the ones before it
left; one that hangs is abandoned at the deadline and the steps after it still run."""

from __future__ import annotations

import asyncio
import threading

from spyrus_hsm.shutdown import GRACE, Shutdown


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_step_is_given_what_the_steps_before_it_left() -> None:
    clock = FakeClock()
    shutdown = Shutdown(8.0, clock)
    told: list[float] = []

    def step(took: float) -> object:
        def run(seconds: float) -> None:
            told.append(seconds)
            clock.now += took  # the step used this much of the budget
        return run

    async def stop() -> list[bool]:
        return [await shutdown.call("events", step(1.0), cap=1.0),
                await shutdown.call("edge", step(3.0), cap=3.0),
                await shutdown.call("audit", step(2.5)),
                await shutdown.call("hsm", step(0.0)),
                await shutdown.call("pcscd", step(0.0), cap=3.0)]

    assert asyncio.run(stop()) == [True] * 5
    # 8 s in all: 1 and 3 (their caps), the rest of 4, then what the audit log left (1.5), both
    # less the grace that lets a step return before it is given up on.
    assert told == [1.0 - GRACE, 3.0 - GRACE, 4.0 - GRACE, 1.5 - GRACE, 1.5 - GRACE]
    assert shutdown.remaining() == 1.5 and shutdown.abandoned == []


def test_a_hanging_step_is_abandoned_at_the_deadline_and_the_later_steps_still_start() -> None:
    shutdown = Shutdown(0.5)
    release = threading.Event()
    later: list[str] = []
    started = threading.Event()

    async def never() -> None:
        await asyncio.Event().wait()

    async def stop() -> list[bool]:
        return [await shutdown.call("audit", lambda _: release.wait()),
                await shutdown.wait("listeners", never()),
                await shutdown.call("hsm", lambda seconds: (later.append(f"hsm told {seconds:g} s"), started.set()))]

    try:
        outcomes = asyncio.run(stop())
    finally:
        release.set()
    # Past the deadline a step is still started (it sets its flags, closes what it can) but
    # not waited for: the stop ends on time.
    assert outcomes == [False, False, False]
    assert shutdown.abandoned == ["audit", "listeners", "hsm"] and shutdown.remaining() == 0.0
    assert started.wait(10) and later == ["hsm told 0 s"]


def test_a_failing_step_is_logged_and_the_stop_goes_on(caplog: object) -> None:
    shutdown = Shutdown(5.0)

    def broken(_: float) -> None:
        raise OSError("the disk went away")

    async def stop() -> list[bool]:
        return [await shutdown.call("audit", broken), await shutdown.call("hsm", lambda _: None)]

    assert asyncio.run(stop()) == [True, True]
    assert "stopping: audit failed: the disk went away" in caplog.text  # type: ignore[attr-defined]
