"""Threads the package starts: long-lived daemon threads, and blocking calls waited for with a
deadline (the SDKs and the synchronous HSM API have calls that can block for ever; a caller
that must answer in time waits on a helper thread and gives up at its deadline)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import TypeVar

T = TypeVar("T")


def spawn(target: Callable[[], None], name: str) -> threading.Thread:
    """`target()` on a new daemon thread (a daemon never holds up the process's exit)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def call_with_deadline(fn: Callable[[], T], seconds: float, what: str, thread_name: str) -> T:
    """`fn()` on a daemon thread, waited for at most `seconds`: its result or its exception, or
    TimeoutError("{what}: no answer within {seconds} s"). A call that misses the deadline is left
    to finish on its own; its outcome is discarded."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    spawn(run, thread_name)
    if not wait([future], seconds).done:
        raise TimeoutError(f"{what}: no answer within {seconds:g} s")
    return future.result()

