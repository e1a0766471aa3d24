"""A bounded pool of worker threads, each owning one PKCS#11 session, plus recovery.

python-pkcs11 does not serialise calls, so no session is ever used by two threads at once:
each worker opens its own and keeps it. The supervisor thread holds the logged-in session
(login is per token) and, when a call meets a device fault, stops taking work, fails what is
queued, waits for in-flight calls to return, finalises and reinitialises the library, finds
the token again by label/serial, logs in again and resumes. C_Finalize is only ever called
with no thread inside the library.

Three ways in:
- `run` (sync): hands the call to a worker and waits at most the call timeout;
- `run` with sync_mode="inline": runs on the calling thread with a session checked out
  exclusively from a bounded set (no thread hand-off, ~4x less overhead on fast tokens, but a
  hung token blocks the caller: there is no per-call timeout);
- `arun` (async): never touches PKCS#11 on the event loop. Concurrent requests made in the
  same loop iteration are batched into worker jobs, so a burst costs one thread wake-up per
  batch rather than one per request; each request keeps its own timeout and contextvars.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

from . import library
from .errors import HsmBusy, HsmError, HsmTimeout, HsmUnavailable, LoginFailed
from .faults import fault_reason, is_device_fault, translate
from .library import TokenSelector
from .operations import WorkerSession
from .secret import Secret

log = logging.getLogger(__name__)
T = TypeVar("T")

Status = Literal["starting", "ready", "degraded", "stopped"]
SyncMode = Literal["worker", "inline"]
MAX_BATCH = 32
# A worker job gathers requests until it holds about this much HSM work: fast tokens amortise
# the thread hand-off over many requests, slow tokens spread a burst over all workers.
BATCH_WORK_SECONDS = 0.0005


@dataclass(frozen=True)
class PoolSettings:
    module_path: str
    token: TokenSelector
    workers: int = 4
    call_timeout: float = 10.0
    queue_limit: int = 256
    sync_mode: SyncMode = "worker"
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


@dataclass
class _Request:
    """One async request waiting in a batch."""
    fn: Callable[[WorkerSession], Any]
    what: str
    future: asyncio.Future[Any]
    ctx: contextvars.Context


PinSource = Secret | Callable[[], Secret]


class HsmPool:
    def __init__(self, settings: PoolSettings, pin: PinSource) -> None:
        """`pin` is the PIN, or a function returning it (re-read at every connection attempt,
        so a fixed PIN file is picked up without a restart)."""
        self.settings = settings
        self._pin_source = pin
        self._refused_pin: bytes | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)          # waiters: drain, close
        self._session_free = threading.Condition(self._lock)  # waiters: inline callers
        self._wake = threading.Event()                        # wakes the supervisor
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._state = HsmState("starting")
        self._accepting = False
        self._recover_requested = True
        self._stopping = False
        self._generation = 0
        self._busy = 0          # threads inside a PKCS#11 call (workers and inline callers)
        self._outstanding = 0   # requests accepted and not yet answered (the bounded queue)
        self._lib: Any = None
        self._token: Any = None
        self._login_session: Any = None
        self._threads: list[threading.Thread] = []
        self._listeners: list[Callable[[HsmState], None]] = []
        self._batchers: dict[asyncio.AbstractEventLoop, _Batcher] = {}
        self._idle: list[tuple[int, WorkerSession]] = []  # inline sessions not in use
        self._inline_sessions = 0
        self._ever_ready = False
        self.op_seconds = 0.001  # moving average of one operation's duration, sizes batches
        self.epoch = 0  # bumped by object-mutating operations: sessions drop handle caches

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, wait: bool = True) -> None:
        """Connect and start the workers.

        wait=True (CLI): connect now; raise the clear error on failure.
        wait=False (service): return at once; the supervisor keeps retrying, state says why.
        """
        if wait:
            self._connect()
            self._ever_ready = True
            self._recover_requested = False
            self._accepting = True
            self._set_state("ready")
        else:
            self._wake.set()  # the supervisor makes the first connection, and retries it
        for i in range(self.settings.workers):
            self._spawn(self._worker, f"hsm-worker-{i}")
        self._spawn(self._supervise, "hsm-supervisor")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers; neither logs out nor finalises (others in the process may use it)."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._accepting = False
            self._cond.notify_all()
            self._session_free.notify_all()
        self._wake.set()
        self._fail_queued(HsmUnavailable("the HSM pool is shutting down"))
        for _ in range(self.settings.workers):
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        # The login session is dropped, not closed: C_Logout would log out every session of
        # the token in this process (pkcs11-provider's too). Process exit ends the login.
        self._login_session = None
        self._set_state("stopped", "shut down")

    @property
    def state(self) -> HsmState:
        return self._state

    def add_listener(self, fn: Callable[[HsmState], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[HsmState], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def queue_depth(self) -> int:
        return self._outstanding

    def bump_epoch(self) -> None:
        self.epoch += 1

    # --- admission ---------------------------------------------------------------------------

    def _admit(self, what: str) -> None:
        """Count one request in, or refuse it at once (not ready, or queue full)."""
        with self._cond:
            if not self._accepting:
                raise HsmUnavailable(self._unavailable_text(what))
            if self._outstanding >= self.settings.queue_limit:
                raise HsmBusy(f"{what}: the HSM queue is full "
                              f"({self.settings.queue_limit} waiting); retry later")
            self._outstanding += 1

    def _release(self, n: int = 1) -> None:
        with self._cond:
            self._outstanding -= n

    def _unavailable_text(self, what: str) -> str:
        st = self._state
        if st.status == "stopped":
            return f"{what}: the HSM pool is stopped"
        return f"{what}: the HSM is not ready ({st.reason or st.status}); retry shortly"

    # --- sync --------------------------------------------------------------------------------

    def submit(self, fn: Callable[[WorkerSession], T], what: str) -> Future[T]:
        """Queue `fn(worker_session)` for a worker; never blocks."""
        self._admit(what)
        fut: Future[T] = Future()
        fut.add_done_callback(lambda _: self._release())
        self._queue.put(_Job(fn, what, fut, contextvars.copy_context()))
        return fut

    def run(self, fn: Callable[[WorkerSession], T], what: str, timeout: float | None = None) -> T:
        _refuse_on_event_loop(what)
        limit = self.settings.call_timeout if timeout is None else timeout
        if self.settings.sync_mode == "inline":
            return self._run_inline(fn, what, limit)
        fut = self.submit(fn, what)
        try:
            return fut.result(timeout=limit)
        except FutureTimeout:
            fut.cancel()
            raise HsmTimeout(f"{what}: the HSM did not answer within {limit:g} s") from None

    def _run_inline(self, fn: Callable[[WorkerSession], T], what: str, limit: float) -> T:
        """Run on the calling thread with a session nobody else uses meanwhile."""
        deadline = time.monotonic() + limit
        with self._lock:
            while True:
                if not self._accepting:
                    raise HsmUnavailable(self._unavailable_text(what))
                generation = self._generation
                ws = self._take_idle(generation)
                if ws is not None or self._inline_sessions < self.settings.workers:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or not self._session_free.wait(left):
                    raise HsmTimeout(f"{what}: no HSM session became free within {limit:g} s")
            if ws is None:
                self._inline_sessions += 1
            self._busy += 1
        try:
            if ws is None:
                ws = WorkerSession(library.open_session(self._token), self._token.label)
                ws.generation = generation
            if ws.epoch != self.epoch:
                ws.clear_cache()
                ws.epoch = self.epoch
            return fn(ws)
        except BaseException as exc:
            if is_device_fault(exc) or isinstance(exc, HsmUnavailable):
                self._request_recovery(fault_reason(exc), generation)
            raise translate(exc, what) from None
        finally:
            with self._lock:
                if ws is not None and generation == self._generation:
                    self._idle.append((generation, ws))
                else:
                    self._inline_sessions -= 1
                self._busy -= 1
                self._session_free.notify()
                if self._busy == 0:
                    self._cond.notify_all()

    def _take_idle(self, generation: int) -> WorkerSession | None:
        while self._idle:
            gen, ws = self._idle.pop()
            if gen == generation:
                return ws
            self._inline_sessions -= 1  # from before a recovery: dead, just dropped
        return None

    # --- async -------------------------------------------------------------------------------

    async def arun(self, fn: Callable[[WorkerSession], T], what: str,
                   timeout: float | None = None) -> T:
        """As `run`, awaiting on the event loop; the PKCS#11 call runs on a worker thread."""
        limit = self.settings.call_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _Batcher(self, loop)
        self._admit(what)
        fut = batcher.add(fn, what)
        try:
            return await asyncio.wait_for(fut, limit)
        except TimeoutError:
            raise HsmTimeout(f"{what}: the HSM did not answer within {limit:g} s") from None

    def _run_batch(self, batch: list[_Request], ws: WorkerSession) -> list[tuple[bool, Any]]:
        """Run a batch on one worker; a device fault fails the rest of the batch at once."""
        results: list[tuple[bool, Any]] = []
        started = time.perf_counter()
        for i, req in enumerate(batch):
            if req.future.cancelled():
                results.append((False, None))
                continue
            try:
                results.append((True, req.ctx.run(req.fn, ws)))
            except BaseException as exc:
                results.append((False, translate(exc, req.what)))
                if is_device_fault(exc) or isinstance(exc, HsmUnavailable):
                    self._request_recovery(fault_reason(exc), ws.generation)
                    gone = HsmUnavailable(self._unavailable_text(req.what))
                    results += [(False, gone)] * (len(batch) - i - 1)
                    break
        per_op = (time.perf_counter() - started) / len(batch)
        self.op_seconds += 0.2 * (per_op - self.op_seconds)
        return results

    # --- workers -------------------------------------------------------------------------------

    def _worker(self) -> None:
        ws: WorkerSession | None = None
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                accepting = self._accepting
                if accepting:
                    self._busy += 1
                    current = self._generation
            if not accepting:  # outside the lock: the future's callbacks take it
                job.future.set_exception(HsmUnavailable(self._unavailable_text(job.what)))
                continue
            try:
                if ws is None or ws.generation != current:
                    # Sessions of an earlier generation died with C_Finalize: drop, never close.
                    ws = WorkerSession(library.open_session(self._token), self._token.label)
                    ws.generation = current
                if ws.epoch != self.epoch:
                    ws.clear_cache()
                    ws.epoch = self.epoch
                result = job.ctx.run(job.fn, ws)
            except BaseException as exc:
                if is_device_fault(exc) or isinstance(exc, HsmUnavailable):
                    self._request_recovery(fault_reason(exc), current)
                    ws = None
                job.future.set_exception(translate(exc, job.what))
            else:
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._busy -= 1
                    if self._busy == 0:
                        self._cond.notify_all()

    # --- recovery ------------------------------------------------------------------------------

    def _request_recovery(self, reason: str, generation: int) -> None:
        with self._cond:
            if self._stopping or generation != self._generation or self._recover_requested:
                return
            log.warning("HSM fault: %s; recovering", reason)
            self._recover_requested = True
            self._accepting = False
            state = self._new_state("degraded", reason)
        self._notify(state)  # outside the lock: a listener may call the HSM
        self._wake.set()

    def _supervise(self) -> None:
        delay = self.settings.retry_min
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                if self._stopping:
                    return
                if not self._recover_requested:
                    continue
            self._fail_queued(HsmUnavailable(self._unavailable_text("HSM call")))
            if not self._drain():
                continue
            try:
                self._reconnect()
            except HsmError as exc:
                self._set_state("degraded", str(exc))
                self._wake.wait(delay)  # close() sets it: stop retrying at once
                self._wake.set()        # and come round again for the next attempt
                delay = min(delay * 2, self.settings.retry_max)
                continue
            delay = self.settings.retry_min
            with self._lock:
                self._generation += 1
                self._inline_sessions -= len(self._idle)
                self._idle.clear()
                self._recover_requested = False
                self._accepting = True
            self._set_state("ready", None, self._state.recoveries + (1 if self._ever_ready else 0))
            self._ever_ready = True
            log.info("HSM ready: token '%s'", self._token.label)

    def _drain(self) -> bool:
        """Wait until no thread is inside a PKCS#11 call (C_Finalize is unsafe otherwise)."""
        deadline = time.monotonic() + 2 * self.settings.call_timeout
        stuck = None
        with self._cond:
            while self._busy and not self._stopping and time.monotonic() <= deadline:
                self._cond.wait(0.5)
            if self._busy and not self._stopping:
                stuck = self._new_state("degraded", f"{self._state.reason}; waiting for {self._busy} "
                                        "HSM call(s) that have not returned")
        if stuck is not None:
            self._notify(stuck)  # outside the lock: a listener may call the HSM
        with self._cond:
            while self._busy and not self._stopping:
                self._cond.wait(0.5)
            return not self._stopping

    def _reconnect(self) -> None:
        """Each attempt starts from a fresh C_Initialize, so re-enumerated devices are seen —
        unless pkcs11-provider shares the module in this process: finalising under it leaves it
        unable to use any key until restart, so then only sessions and the login are renewed."""
        if self._lib is not None:
            self._login_session = None
            self._token = None
            if not library.is_shared(self.settings.module_path):
                library.finalize_quietly(self._lib)
                library.initialize(self._lib)
        self._connect()

    def _connect(self) -> None:
        s = self.settings
        if self._lib is None:
            self._lib = library.load_module(s.module_path)
        token = library.find_token(self._lib, s.token)
        pin = self._pin_source() if callable(self._pin_source) else self._pin_source
        digest = hashlib.sha256(pin.reveal()).digest()
        if self._refused_pin is not None and hmac.compare_digest(digest, self._refused_pin):
            # Retrying a refused PIN would count towards locking the token: wait for a new one.
            raise LoginFailed(f"token '{token.label}': the token refused the PIN; fix the PIN file "
                              "(not retried until its content changes, so the PIN is not locked)")
        try:
            self._login_session = library.login(token, pin)
        except LoginFailed as exc:
            if exc.pin_refused:  # not when the token has no user PIN yet: it is being set up
                self._refused_pin = digest
            raise
        self._refused_pin = None
        self._token = token
        info = library.summarise(token)
        self._state = HsmState(self._state.status, self._state.reason, info.label, info.serial,
                               recoveries=self._state.recoveries)

    def _fail_queued(self, error: HsmError) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._queue.put(None)
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _set_state(self, status: Status, reason: str | None = None,
                   recoveries: int | None = None) -> None:
        self._notify(self._new_state(status, reason, recoveries))

    def _new_state(self, status: Status, reason: str | None = None,
                   recoveries: int | None = None) -> HsmState:
        old = self._state
        new = HsmState(status, reason, old.token_label, old.token_serial,
                       recoveries=old.recoveries if recoveries is None else recoveries)
        self._state = new
        return new

    def _notify(self, new: HsmState) -> None:
        for fn in list(self._listeners):
            try:
                fn(new)
            except Exception:
                log.exception("HSM state listener failed")


class _Batcher:
    """Collects one event loop's HSM requests and hands them to workers in batches."""

    def __init__(self, pool: HsmPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.pending: list[_Request] = []

    def add(self, fn: Callable[[WorkerSession], Any], what: str) -> asyncio.Future[Any]:
        fut = self.loop.create_future()
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(_Request(fn, what, fut, contextvars.copy_context()))
        return fut

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        spread = -(-len(batch) // self.pool.settings.workers)
        amortise = int(BATCH_WORK_SECONDS / max(self.pool.op_seconds, 1e-6))
        size = max(1, min(MAX_BATCH, max(spread, amortise)))
        try:
            self._submit_chunks(batch, size)
        except BaseException as exc:  # never leave a caller waiting on a lost batch
            self.pool._release(len(batch))
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(translate(exc, req.what))

    def _submit_chunks(self, batch: list[_Request], size: int) -> None:
        for i in range(0, len(batch), size):
            chunk = batch[i:i + size]
            job_future: Future[list[tuple[bool, Any]]] = Future()
            job_future.add_done_callback(partial(self._resolve_threadsafe, chunk))
            self.pool._queue.put(_Job(partial(self.pool._run_batch, chunk), chunk[0].what,
                                      job_future, contextvars.Context()))

    def _resolve_threadsafe(self, chunk: list[_Request], job_future: Future[Any]) -> None:
        self.loop.call_soon_threadsafe(self._resolve, chunk, job_future)

    def _resolve(self, chunk: list[_Request], job_future: Future[list[tuple[bool, Any]]]) -> None:
        self.pool._release(len(chunk))
        exc = job_future.exception()
        results = [(False, exc)] * len(chunk) if exc is not None else job_future.result()
        for req, (ok, value) in zip(chunk, results, strict=True):
            if req.future.done():
                continue
            if ok:
                req.future.set_result(value)
            else:
                req.future.set_exception(value or HsmUnavailable(req.what))


def _refuse_on_event_loop(what: str) -> None:
    if asyncio._get_running_loop() is None:
        return
    raise RuntimeError(f"{what}: a blocking HSM call on the event loop thread; use the async API")
