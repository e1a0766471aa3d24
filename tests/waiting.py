"""Waiting in tests: poll a condition until a deadline instead of sleeping a fixed time.

A fixed sleep is either too short on a loaded machine (a flake) or too long everywhere (a slow
suite). `wait_for` returns as soon as the condition holds and, when it never does, fails with
what was awaited and the last value seen, so the failure says more than "timed out".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EVERY = 0.02  # seconds between polls: short next to any deadline, long enough not to spin


def wait_for(condition: Callable[[], T], within: float, what: str, *, every: float = EVERY,
             alive: Callable[[], object] | None = None) -> T:
    """Poll `condition` until it returns something truthy and return that value.

    `alive`, when given, is called before each poll and should raise (or fail the test) when
    waiting longer is pointless, e.g. the process under test has exited; its return value is
    ignored. Raises AssertionError naming `what` and the last value after `within` seconds.
    """
    end = time.monotonic() + within
    while True:
        if alive is not None:
            alive()
        last = condition()
        if last:
            return last
        if time.monotonic() >= end:
            raise AssertionError(f"not {what} within {within} s (last value: {last!r})")
        time.sleep(every)


async def await_for(condition: Callable[[], T], within: float, what: str, *, every: float = EVERY) -> T:
    """`wait_for` for a coroutine: the event loop keeps running between polls."""
    end = time.monotonic() + within
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= end:
            raise AssertionError(f"not {what} within {within} s (last value: {last!r})")
        await asyncio.sleep(every)


def holds_for(condition: Callable[[], object], during: float, what: str, *, every: float = EVERY) -> None:
    """Check that `condition` stays truthy for `during` seconds (for "nothing happens" claims)."""
    end = time.monotonic() + during
    while True:
        last = condition()
        assert last, f"{what} stopped holding (value: {last!r})"
        if time.monotonic() >= end:
            return
        time.sleep(every)
