"""A bounded pool of worker threads, each owning one PKCS#11 session, plus recovery.

python-pkcs11 initialises the library without locking callbacks, so no session is ever shared
between threads: each worker opens its own and keeps it. One supervisor thread holds the
logged-in session (login is per token) and, when a worker meets a device fault, stops taking
work, fails what is queued, waits for in-flight calls to return, finalises and reinitialises
the library, finds the token again by label/serial, logs in again and resumes. C_Finalize is
only ever called with no thread inside the library.

Callers' contextvars (trace context) are carried into the worker with `Context.run`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from . import library
from .errors import HsmBusy, HsmConfigError, HsmError, HsmTimeout, HsmUnavailable, LoginFailed
from .faults import fault_reason, is_device_fault, translate
from .library import TokenSelector
from .operations import WorkerSession
from .secret import Secret

log = logging.getLogger(__name__)
T = TypeVar("T")

Status = Literal["starting", "ready", "degraded", "stopped"]


@dataclass(frozen=True)
class PoolSettings:
    module_path: str
    token: TokenSelector
    workers: int = 4
    call_timeout: float = 10.0
    queue_limit: int = 256
    retry_min: float = 0.25
    retry_max: float = 5.0


@dataclass(frozen=True)
class HsmState:
    status: Status
    reason: str | None = None
    token_label: str | None = None
    token_serial: str | None = None
    since: float = field(default_factory=time.time)
    recoveries: int = 0

    @property
    def ready(self) -> bool:
        return self.status == "ready"


@dataclass
class _Job:
    fn: Callable[[WorkerSession], Any]
    what: str
    future: Future[Any]
    ctx: contextvars.Context


class HsmPool:
    def __init__(self, settings: PoolSettings, pin: Secret) -> None:
        self.settings = settings
        self._pin = pin
        self._cond = threading.Condition()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=settings.queue_limit)
        self._state = HsmState("starting")
        self._accepting = False
        self._recover_requested = True
        self._stopping = False
        self._generation = 0
        self._busy = 0
        self._lib: Any = None
        self._token: Any = None
        self._login_session: Any = None
        self._threads: list[threading.Thread] = []
        self._listeners: list[Callable[[HsmState], None]] = []
        self.epoch = 0  # bumped by object-mutating operations: workers drop handle caches

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, wait: bool = True) -> None:
        """Connect and start the workers.

        wait=True (CLI): connect now; raise the clear error on failure.
        wait=False (service): return at once; the supervisor keeps retrying, state says why.
        """
        if wait:
            self._connect()
            self._recover_requested = False
            self._set_state("ready")
            self._accepting = True
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._worker, name=f"hsm-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        sup = threading.Thread(target=self._supervise, name="hsm-supervisor", daemon=True)
        sup.start()
        self._threads.append(sup)

    def close(self, timeout: float = 5.0) -> None:
        """Stop workers and close sessions; does not C_Finalize (see pitfalls: provider)."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._accepting = False
            self._cond.notify_all()
        self._fail_queued(HsmUnavailable("the HSM pool is shutting down"))
        for _ in range(self.settings.workers):
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            if self._busy == 0 and self._login_session is not None:
                try:
                    self._login_session.close()
                except Exception:  # noqa: S110 - best effort at shutdown
                    pass
                self._login_session = None
        self._set_state("stopped", "shut down")

    @property
    def state(self) -> HsmState:
        return self._state

    def add_listener(self, fn: Callable[[HsmState], None]) -> None:
        self._listeners.append(fn)

    def queue_depth(self) -> int:
        return self._queue.qsize()

    # --- work ----------------------------------------------------------------------------------

    def submit(self, fn: Callable[[WorkerSession], T], what: str) -> Future[T]:
        """Queue `fn(worker_session)`; never blocks. Fails fast when the HSM is not ready."""
        if not self._accepting:
            raise HsmUnavailable(self._unavailable_text(what))
        fut: Future[T] = Future()
        try:
            self._queue.put_nowait(_Job(fn, what, fut, contextvars.copy_context()))
        except queue.Full:
            raise HsmBusy(
                f"{what}: the HSM queue is full ({self.settings.queue_limit} waiting); retry later"
            ) from None
        return fut

    def run(self, fn: Callable[[WorkerSession], T], what: str, timeout: float | None = None) -> T:
        fut = self.submit(fn, what)
        limit = self.settings.call_timeout if timeout is None else timeout
        try:
            return fut.result(timeout=limit)
        except FutureTimeout:
            fut.cancel()
            raise HsmTimeout(f"{what}: the HSM did not answer within {limit:g} s") from None

    async def arun(self, fn: Callable[[WorkerSession], T], what: str,
                   timeout: float | None = None) -> T:
        """As `run`, awaiting on the event loop; the PKCS#11 call runs on a worker thread."""
        fut = self.submit(fn, what)
        limit = self.settings.call_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), limit)
        except TimeoutError:
            raise HsmTimeout(f"{what}: the HSM did not answer within {limit:g} s") from None

    def _unavailable_text(self, what: str) -> str:
        st = self._state
        if st.status == "stopped":
            return f"{what}: the HSM pool is stopped"
        return f"{what}: the HSM is not ready ({st.reason or st.status}); retry shortly"

    # --- workers -------------------------------------------------------------------------------

    def _worker(self) -> None:
        ws: WorkerSession | None = None
        generation = -1
        epoch = -1
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            with self._cond:
                if not self._accepting:
                    job.future.set_exception(HsmUnavailable(self._unavailable_text(job.what)))
                    continue
                self._busy += 1
                current = self._generation
            try:
                if ws is None or generation != current:
                    # Sessions of an earlier generation died with C_Finalize: drop, never close.
                    ws = WorkerSession(library.open_session(self._token), self._token.label)
                    generation = current
                if epoch != self.epoch:
                    ws.clear_cache()
                    epoch = self.epoch
                result = job.ctx.run(job.fn, ws)
            except BaseException as exc:
                if is_device_fault(exc) or isinstance(exc, HsmUnavailable):
                    self._request_recovery(fault_reason(exc), current)
                    ws = None
                job.future.set_exception(translate(exc, job.what))
            else:
                job.future.set_result(result)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def bump_epoch(self) -> None:
        self.epoch += 1

    # --- recovery ------------------------------------------------------------------------------

    def _request_recovery(self, reason: str, generation: int) -> None:
        with self._cond:
            if self._stopping or generation != self._generation or self._recover_requested:
                return
            log.warning("HSM fault: %s; recovering", reason)
            self._recover_requested = True
            self._accepting = False
            self._set_state("degraded", reason)
            self._cond.notify_all()

    def _supervise(self) -> None:
        delay = self.settings.retry_min
        while True:
            with self._cond:
                while not self._recover_requested and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            self._fail_queued(HsmUnavailable(self._unavailable_text("HSM call")))
            if not self._drain():
                continue
            try:
                self._reconnect()
            except HsmError as exc:
                self._set_state("degraded", str(exc))
                with self._cond:
                    self._cond.wait(delay)
                delay = min(delay * 2, self.settings.retry_max)
                continue
            delay = self.settings.retry_min
            with self._cond:
                self._generation += 1
                self._recover_requested = False
                self._accepting = True
                recoveries = self._state.recoveries + (1 if self._lib is not None else 0)
            self._set_state("ready", None, recoveries)
            log.info("HSM ready: token '%s'", self._token.label)

    def _drain(self) -> bool:
        """Wait until no worker is inside a PKCS#11 call (C_Finalize is unsafe otherwise)."""
        deadline = time.monotonic() + 2 * self.settings.call_timeout
        with self._cond:
            while self._busy and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._set_state("degraded", f"{self._state.reason}; waiting for {self._busy} "
                                    "HSM call(s) that have not returned")
                    deadline = time.monotonic() + self.settings.call_timeout
                self._cond.wait(min(max(left, 0.05), 1.0))
            return not self._stopping

    def _reconnect(self) -> None:
        if self._lib is not None:
            self._login_session = None
            self._token = None
            library.finalize_quietly(self._lib)
            library.initialize(self._lib)
        self._connect()

    def _connect(self) -> None:
        s = self.settings
        if self._lib is None:
            self._lib = library.load_module(s.module_path)
        token = library.find_token(self._lib, s.token)
        self._login_session = library.login(token, self._pin)
        self._token = token
        info = library.summarise(token)
        self._state = HsmState("starting", None, info.label, info.serial,
                               recoveries=self._state.recoveries)

    def _fail_queued(self, error: HsmError) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._queue.put_nowait(None)
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _set_state(self, status: Status, reason: str | None = None,
                   recoveries: int | None = None) -> None:
        old = self._state
        new = HsmState(status, reason, old.token_label, old.token_serial,
                       recoveries=old.recoveries if recoveries is None else recoveries)
        self._state = new
        for fn in self._listeners:
            try:
                fn(new)
            except Exception:
                log.exception("HSM state listener failed")


__all__ = ["HsmConfigError", "HsmPool", "HsmState", "LoginFailed", "PoolSettings"]
