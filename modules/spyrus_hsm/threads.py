"""Threads the package starts: long-lived daemon threads, and blocking calls waited for with a
deadline (the SDKs and the synchronous HSM API have calls that can block for ever; a caller
that must answer in time waits on a helper thread and gives up at its deadline)."""

from __future__ import annotations

import threading
import time
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
    future = start(fn, thread_name)
    if not wait([future], seconds).done:
        raise TimeoutError(f"{what}: no answer within {seconds:g} s")
    return future.result()



def start(fn: Callable[[], T], thread_name: str) -> Future[T]:
    """`fn()` on a new daemon thread; its outcome in the future returned."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever holds the future
            future.set_exception(exc)

    spawn(run, thread_name)
    return future


class Lane:
    """Blocking calls of one kind, each on a helper thread waited for with a deadline, at most
    `width` of them at once. A call that misses its deadline keeps its place until it does
    return, so calls that never return hold at most `width` threads, not one per attempt:
    once the lane is full, a caller waits for a place (within the same deadline) or gives up
    without starting another thread."""

    def __init__(self, name: str, width: int = 1) -> None:
        self.name = name
        self.width = width
        self._places = threading.BoundedSemaphore(width)
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        """Calls started and not yet returned (some perhaps given up on)."""
        with self._lock:
            return self._busy

    def submit(self, fn: Callable[[], T], seconds: float, what: str) -> Future[T]:
        """Start `fn()` once a place is free (TimeoutError if none is within `seconds`)."""
        if not self._places.acquire(timeout=max(0.0, seconds)):
            raise TimeoutError(f"{what}: {self.width} earlier call(s) still have no answer")
        with self._lock:
            self._busy += 1

        def run() -> T:
            try:
                return fn()
            finally:
                with self._lock:
                    self._busy -= 1
                self._places.release()

        try:
            return start(run, self.name)
        except BaseException:
            with self._lock:
                self._busy -= 1
            self._places.release()
            raise

    def call(self, fn: Callable[[], T], seconds: float, what: str) -> T:
        """`fn()`'s result or exception, or TimeoutError("{what}: no answer within …") after
        `seconds` in all (the wait for a place included)."""
        began = time.monotonic()
        future = self.submit(fn, seconds, what)
        if not wait([future], max(0.0, seconds - (time.monotonic() - began))).done:
            raise TimeoutError(f"{what}: no answer within {seconds:g} s")
        return future.result()


class Worker:
    """The background thread(s) of one object, with one way to stop them. Its loop, `target` (or
    `run()` in a subclass), watches `stop_event`; `on_close` (or `_wake_for_close()`) interrupts
    a wait that event does not end (a queue, another event), once, on the first `close`. More
    threads may be started with `spawn`. `close(timeout)` is idempotent and bounded: safe twice,
    safe before `start`, never waits longer than `timeout` in all, and says whether every thread
    has ended."""

    def __init__(self, name: str, target: Callable[[], None] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.name = name
        self.stop_event = threading.Event()
        self._target = target
        self._on_close = on_close
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def start(self) -> None:
        """`run()` on a daemon thread named after the worker."""
        self.spawn(self.run, self.name)

    def run(self) -> None:
        """The worker's loop: `target`, or a subclass's own; a worker whose threads all come
        from `spawn` has none, and `start` then runs nothing."""
        if self._target is not None:
            self._target()

    def spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Another thread of this worker, joined by `close`."""
        with self._threads_lock:
            thread = spawn(target, name)
            self._threads.append(thread)
        return thread

    def _wake_for_close(self) -> None:
        if self._on_close is not None:
            self._on_close()

    def close(self, timeout: float) -> bool:
        """Stop and wait at most `timeout` seconds for the threads; True if none is left running
        (a thread closing its own worker is not waited for, and counts as ending)."""
        with self._threads_lock:
            first = not self.stop_event.is_set()
            self.stop_event.set()
        if first:
            self._wake_for_close()
        deadline = time.monotonic() + max(0.0, timeout)
        with self._threads_lock:
            threads = [t for t in self._threads if t is not threading.current_thread()]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)
