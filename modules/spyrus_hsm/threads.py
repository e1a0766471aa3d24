"""Every thread the package starts, in one of two shapes, and nothing else starts one:

- a **Lane**: blocking calls of one kind (a PKCS#11 read, an SDK call, a DPS registration, a
  step of the stop), each on a helper thread waited for with a deadline, at most `width` at
  once. From a thread: `call` (or `submit`); from the event loop: `run` (awaitable, keeps the
  caller's contextvars, so its span). A call that misses its deadline keeps its place until
  it does return, so calls that never return hold at most `width` threads, not one per
  attempt: once the lane is full, a caller waits for a place (within the same deadline) or
  gives up without starting another thread. `running()` says what is still running.
- a **Worker**: the long-lived loop(s) of one object, with a stop event and a bounded close.

Both run daemon threads (one never holds up the process's exit: Python 3.11's `asyncio.run`
waits for the default executor without a timeout, and the interpreter joins non-daemon
threads, so `asyncio.to_thread`, `run_in_executor` and private executors are not used:
tests/unit/test_thread_model.py checks the source). Each registers itself, so that the stop
can close every lane and worker within its one budget (`close_all`) and say what is still
running (`still_running`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any, TypeVar

from .errors import Kind, SpyrusError

T = TypeVar("T")

_lanes: weakref.WeakSet[Lane] = weakref.WeakSet()
_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


class LaneClosed(SpyrusError, kind=Kind.UNAVAILABLE):
    """The module is stopping: a lane takes no new call."""

    public_detail = "the module is stopping"


def _daemon(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


class Lane:
    """Blocking calls of one kind, at most `width` at once, each waited for with a deadline."""

    def __init__(self, name: str, width: int = 1) -> None:
        self.name = name
        self.width = width
        self._places = threading.BoundedSemaphore(width)
        self._lock = threading.Lock()
        self._running: dict[int, str] = {}   # call number -> what it is
        self._calls = 0
        self._closed = False
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._idle = threading.Condition(self._lock)
        _lanes.add(self)

    @property
    def busy(self) -> int:
        """Calls started and not yet returned (some perhaps given up on)."""
        with self._lock:
            return len(self._running)

    def running(self) -> list[str]:
        """What the calls started and not yet returned are doing."""
        with self._lock:
            return list(self._running.values())

    # --- from a thread ---------------------------------------------------------------------

    def submit(self, fn: Callable[[], T], seconds: float, what: str) -> Future[T]:
        """Start `fn()` once a place is free (TimeoutError if none is within `seconds`)."""
        self._refuse_if_closed(what)
        if not self._places.acquire(timeout=max(0.0, seconds)):
            raise TimeoutError(f"{what}: {self.width} earlier call(s) still have no answer")
        return self._start(fn, what, None)

    def call(self, fn: Callable[[], T], seconds: float, what: str) -> T:
        """`fn()`'s result or exception, or TimeoutError("{what}: no answer within …") after
        `seconds` in all (the wait for a place included)."""
        began = time.monotonic()
        future = self.submit(fn, seconds, what)
        if not wait([future], max(0.0, seconds - (time.monotonic() - began))).done:
            raise TimeoutError(f"{what}: no answer within {seconds:g} s")
        return future.result()

    # --- from the event loop ---------------------------------------------------------------

    async def run(self, fn: Callable[[], T], seconds: float, what: str) -> T:
        """`call` for the event loop: waits without blocking it, and `fn` runs in the caller's
        contextvars (its current span)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        self._refuse_if_closed(what)
        while not self._places.acquire(blocking=False):
            waiter = loop.create_future()
            with self._lock:
                self._async_waiters.append((loop, waiter))
            if self._places.acquire(blocking=False):  # freed between the two: no wake-up lost
                self._forget_waiter(waiter)
                break
            try:
                await asyncio.wait_for(waiter, max(0.0, seconds - (loop.time() - began)))
            except TimeoutError:
                raise TimeoutError(f"{what}: {self.width} earlier call(s) still have no answer") from None
            finally:
                self._forget_waiter(waiter)
        done: asyncio.Future[T] = loop.create_future()
        # A caller cancelled meanwhile (the stop cancels its tasks) no longer waits: the call's
        # outcome is still taken here, so asyncio never reports it as "never retrieved".
        done.add_done_callback(_retrieved)
        ctx = contextvars.copy_context()
        self._start(lambda: ctx.run(fn), what, (loop, done))
        try:
            return await asyncio.wait_for(asyncio.shield(done), max(0.0, seconds - (loop.time() - began)))
        except TimeoutError:
            raise TimeoutError(f"{what}: no answer within {seconds:g} s") from None

    # --- stopping ----------------------------------------------------------------------------

    def close(self, timeout: float) -> list[str]:
        """Take no new call; wait at most `timeout` for those running. What is still running."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._idle:
            self._closed = True
            while self._running and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            return list(self._running.values())

    # --- internals ---------------------------------------------------------------------------

    def _refuse_if_closed(self, what: str) -> None:
        if self._closed:
            raise LaneClosed(f"{what}: the module is stopping ({self.name} takes no new call)")

    def _forget_waiter(self, waiter: asyncio.Future[None]) -> None:
        with self._lock:
            self._async_waiters = [(lp, w) for lp, w in self._async_waiters if w is not waiter]

    def _start(self, fn: Callable[[], T], what: str,
               awaiting: tuple[asyncio.AbstractEventLoop, asyncio.Future[T]] | None) -> Future[T]:
        """Run `fn` on a new daemon thread holding the place already taken."""
        future: Future[T] = Future()
        with self._lock:
            self._calls += 1
            number = self._calls
            self._running[number] = what

        def run() -> None:
            # The place is free before the outcome is handed over: a caller that goes on at
            # once finds the lane as the call left it.
            try:
                result = fn()
            except BaseException as exc:  # handed to whoever holds the future
                self._release(number)
                future.set_exception(exc)
                _hand_over(awaiting, None, exc)
            else:
                self._release(number)
                future.set_result(result)
                _hand_over(awaiting, result, None)

        try:
            _daemon(run, self.name)
        except BaseException:
            self._release(number)
            raise
        return future

    def _release(self, number: int) -> None:
        with self._idle:
            self._running.pop(number, None)
            waiters, self._async_waiters = self._async_waiters, []
            self._idle.notify_all()
        self._places.release()
        for loop, waiter in waiters:
            _soon(loop, functools.partial(_wake, waiter))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _hand_over(awaiting: tuple[asyncio.AbstractEventLoop, asyncio.Future[T]] | None,
               result: T | None, exc: BaseException | None) -> None:
    if awaiting is None:
        return
    loop, done = awaiting

    def settle() -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    _soon(loop, settle)


def _soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


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
        _workers.add(self)

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
            thread = _daemon(target, name)
            self._threads.append(thread)
        return thread

    def alive(self) -> list[str]:
        """The names of this worker's threads still running."""
        with self._threads_lock:
            return [t.name for t in self._threads if t.is_alive()]

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


def close_all(timeout: float) -> list[str]:
    """Close every worker and lane of the process within `timeout` seconds in all (each given
    what is left): what is still running, as "name: what" (empty when everything ended)."""
    deadline = time.monotonic() + max(0.0, timeout)
    for worker in list(_workers):
        worker.close(max(0.0, deadline - time.monotonic()))
    for lane in list(_lanes):
        lane.close(max(0.0, deadline - time.monotonic()))
    return still_running()


def still_running() -> list[str]:
    """Every call of a lane and every worker thread still running, as "name: what"."""
    out = [f"{w.name}: {name}" for w in list(_workers) for name in w.alive()]
    out += [f"{lane.name}: {what}" for lane in list(_lanes) for what in lane.running()]
    return sorted(out)
