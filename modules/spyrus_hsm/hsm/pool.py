"""A bounded pool of worker threads, each owning one PKCS#11 session, and when to recover.

python-pkcs11 does not serialise calls, so no session is ever used by two threads at once:
each worker opens its own and keeps it. Work is admitted against a bounded count of
outstanding requests (refused at once when full or when the token is not ready) and runs on a
worker with a per-call timeout. Queued work is taken by priority, then in order of arrival:
work someone is waiting for (`URGENT`) before background work (`BACKGROUND`, e.g. refreshing a
cached token ahead of its expiry). A serial token (`PoolSettings.serial`: a USB token executes one
operation at a time whatever the number of sessions) gets one worker and one session, so that
order is the order in which the token signs. When a call meets a device fault, or finds the token's
contents changed, the supervisor thread stops admitting work, fails what is queued, waits for
in-flight calls to return and has `recovery.Connection` reconnect; then the workers open new
sessions. State listeners are called outside the pool's lock, so one may call the HSM.

The async way in (batching requests from an event loop) is `hsm.batcher`, built on the public
methods here.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TypeVar, cast

import pkcs11.exceptions as p11e

from ..backoff import Backoff
from ..threads import Worker
from .capabilities import Capabilities
from .errors import HsmBusy, HsmError, HsmTimeout, HsmUnavailable, TokenChanged
from .faults import fault_reason, is_device_fault, translate
from .operations import ObjectKey, WorkerSession
from .recovery import Connection, PinSource
from .state import HsmState, PoolSettings, Status

log = logging.getLogger(__name__)
T = TypeVar("T")

URGENT, BACKGROUND = 0, 1   # job priorities: lower runs first
_STOP = 2                  # the workers' stop signal comes after every queued job
PROVIDER_SESSIONS = 2      # sessions left to pkcs11-provider on a token with a session limit
_RESTART_TEXT = ("; the PKCS#11 module is shared with the OpenSSL provider, so it cannot be "
                 "re-initialised in this process: the module needs a restart")


@dataclass
class _Job:
    fn: Callable[[WorkerSession], object]
    what: str
    future: Future[object]
    ctx: contextvars.Context


class HsmPool:
    def __init__(self, settings: PoolSettings, pin: PinSource) -> None:
        self.settings = settings
        self._conn = Connection(settings.module_path, settings.token, pin, settings.refused_pins)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # waiters: drain
        self._wake = threading.Event()                # wakes the supervisor
        self._queue: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue()
        self._order = itertools.count()  # arrival order within a priority (next() is atomic)
        self.workers = 1 if settings.serial else settings.workers
        self._active = self.workers  # workers taking jobs: fewer where the token allows fewer sessions
        self._fitted_to: int | None = None  # the session limit `_active` was last fitted to
        self._state = HsmState("starting")
        self._accepting = False
        self._recover_requested = True
        self._change: str | None = None  # the token change behind the requested recovery
        self._stopping = False
        self._generation = 0
        self._seen: set[ObjectKey] = set()  # objects found in this generation (see WorkerSession)
        self._busy = 0          # workers inside a PKCS#11 call
        self._outstanding = 0   # requests admitted and not yet answered (the bounded queue)
        self._threads = Worker("hsm-pool")  # the workers and the supervisor, joined by close
        self._listeners: list[Callable[[HsmState], None]] = []
        self._ever_ready = False
        self._explain: Callable[[], str | None] | None = None
        self.epoch = 0  # bumped by object-mutating operations: sessions drop handle caches

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, wait: bool = True) -> None:
        """Connect and start the workers.

        wait=True (CLI): connect now; raise the clear error on failure.
        wait=False (service): return at once; the supervisor keeps retrying, state says why.
        """
        info = None
        if wait:
            info = self._conn.connect()
            self._ever_ready = True
            self._recover_requested = False
            self._accepting = True
            self._fit_workers()
        else:
            self._wake.set()  # the supervisor makes the first connection, and retries it
        for i in range(self.workers):
            self._spawn(functools.partial(self._worker, i), f"hsm-worker-{i}")
        self._spawn(self._supervise, "hsm-supervisor")
        if info is not None:  # the workers run: a listener told "ready" may call the HSM
            self._set_state("ready", token=(info.label, info.serial))

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        self._threads.spawn(target, name)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers; neither logs out nor finalises (others in the process may use it)."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._accepting = False
            self._cond.notify_all()
        self._wake.set()
        self._fail_queued(HsmUnavailable("the HSM pool is shutting down"))
        for _ in range(self.workers):
            self._put(_STOP, None)
        self._threads.close(timeout)
        self._conn.drop()
        self._set_state("stopped", "shut down")

    @property
    def state(self) -> HsmState:
        return self._state

    @property
    def capabilities(self) -> Capabilities | None:
        """What the token can do, asked at the last connection (None: never connected)."""
        return self._conn.capabilities

    def learned(self, capabilities: Capabilities) -> None:
        """What was asked of the token since it connected (whether it stores secret keys)."""
        self._conn.capabilities = capabilities

    def add_listener(self, fn: Callable[[HsmState], None]) -> None:
        """Call `fn(state)` on every state change, on the thread that made it (a worker or the
        supervisor), outside the pool's lock."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[HsmState], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def explain_faults(self, fn: Callable[[], str | None] | None) -> None:
        """While the token is missing, `fn()` says why in the transport's terms ("card removed
        from reader X"); its answer replaces the PKCS#11 reason in the state (None: keep it).
        Called on an HSM thread, outside the pool's lock."""
        self._explain = fn

    def _explained(self, reason: str) -> str:
        if self._explain is None:
            return reason
        try:
            better = self._explain()
        except Exception:
            log.exception("explaining an HSM fault failed")
            return reason
        if better and better != reason:
            log.debug("HSM: %s (PKCS#11: %s)", better, reason)
        return better or reason

    def queue_depth(self) -> int:
        return self._outstanding

    def bump_epoch(self) -> None:
        self.epoch += 1

    # --- admission ---------------------------------------------------------------------------

    def admit(self, what: str, n: int = 1, background: bool = False) -> None:
        """Count `n` requests in, or refuse them at once (not ready, or queue full).
        Background work may fill only half the queue, so it never crowds out requests.
        Each admitted request is released exactly once, by `release`."""
        limit = self.settings.queue_limit // 2 if background else self.settings.queue_limit
        with self._cond:
            if not self._accepting:
                raise HsmUnavailable(self.unavailable_text(what))
            if self._outstanding + n > limit:
                raise HsmBusy(f"{what}: the HSM queue is full "
                              f"({self.settings.queue_limit} waiting); retry later")
            self._outstanding += n

    def release(self, n: int = 1) -> None:
        with self._cond:
            self._outstanding -= n

    def unavailable_text(self, what: str) -> str:
        st = self._state
        if st.status == "stopped":
            return f"{what}: the HSM pool is stopped"
        return f"{what}: the HSM is not ready ({st.reason or st.status}); retry shortly"

    # --- running work ------------------------------------------------------------------------

    def submit(self, fn: Callable[[WorkerSession], T], what: str) -> Future[T]:
        """Admit and queue `fn(worker_session)` for a worker; never blocks."""
        self.admit(what)
        fut: Future[object] = Future()
        fut.add_done_callback(lambda _: self.release())
        self._put(URGENT, _Job(fn, what, fut, contextvars.copy_context()))
        return cast("Future[T]", fut)  # the worker sets it to fn's result

    def dispatch(self, fn: Callable[[WorkerSession], T], what: str, priority: int = URGENT) -> Future[T]:
        """Queue work the caller has already admitted (and releases itself); runs in an empty
        context. A device fault inside `fn` is the caller's to report (`report_fault`)."""
        fut: Future[object] = Future()
        self._put(priority, _Job(fn, what, fut, contextvars.Context()))
        return cast("Future[T]", fut)

    def _put(self, priority: int, job: _Job | None) -> None:
        self._queue.put((priority, next(self._order), job))

    def run(self, fn: Callable[[WorkerSession], T], what: str, timeout: float | None = None) -> T:
        """Run `fn(worker_session)` on a worker; wait at most the call timeout."""
        _refuse_on_event_loop(what)
        limit = self.settings.call_timeout if timeout is None else timeout
        fut = self.submit(fn, what)
        try:
            return fut.result(timeout=limit)
        except FutureTimeout:
            fut.cancel()
            raise HsmTimeout(f"{what}: the HSM did not answer within {limit:g} s") from None

    def report_fault(self, exc: BaseException, ws: WorkerSession) -> bool:
        """Start recovery if `exc` (raised on `ws`) means the token went away or changed;
        returns whether it did (then `ws` is dead)."""
        if not (is_device_fault(exc) or isinstance(exc, HsmUnavailable)):
            return False
        change = str(exc) if isinstance(exc, TokenChanged) else None
        self._request_recovery(fault_reason(exc), ws.generation, change)
        return True

    def _fit_workers(self) -> None:
        """As many workers take jobs as the token has sessions for: its stated limit, less the
        login session and PROVIDER_SESSIONS for pkcs11-provider (a smart card may allow 4 in all;
        a worker whose C_OpenSession is refused would fail every job it took)."""
        caps = self._conn.capabilities
        limit = caps.max_sessions if caps is not None else None
        if limit is None or limit == self._fitted_to:
            return
        usable = max(1, min(self.workers, limit - 1 - PROVIDER_SESSIONS))
        with self._cond:
            self._fitted_to, self._active = limit, usable
            self._cond.notify_all()
        if usable < self.workers:  # selftest warns about the setting; every command need not
            log.info("token allows %d sessions at once: %d of the %d HSM workers are used (one session "
                        "is the login's, %d are left for pkcs11-provider); set hsm.workers to %d",
                        limit, usable, self.workers, PROVIDER_SESSIONS, usable)

    def _retire(self, index: int) -> None:
        """Worker `index` could open no session (CKR_SESSION_COUNT on a token that states no
        limit): it and those after it take no more jobs."""
        with self._cond:
            if index < self._active:
                self._active = max(1, index)
                log.warning("the token refused another session: %d HSM worker(s) are used from now "
                            "on; set hsm.workers to %d", self._active, self._active)

    def _worker(self, index: int) -> None:
        ws: WorkerSession | None = None
        while True:
            with self._cond:
                while index >= self._active and not self._stopping:
                    self._cond.wait()  # a worker the token has no session for sits out
                if self._stopping and index >= self._active:
                    return
            _, _, job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                accepting = self._accepting
                if accepting:
                    self._busy += 1
                    generation, seen = self._generation, self._seen
            if not accepting:  # outside the lock: the future's callbacks take it
                job.future.set_exception(HsmUnavailable(self.unavailable_text(job.what)))
                continue
            try:
                if ws is None or ws.generation != generation:
                    # Sessions of an earlier generation died with C_Finalize: drop, never close.
                    ws = self._new_session(generation, seen)
                if ws.epoch != self.epoch:
                    ws.clear_cache()
                    ws.epoch = self.epoch
                result = job.ctx.run(job.fn, ws)
            except BaseException as exc:
                if ws is None:  # opening the session failed
                    if isinstance(exc, p11e.SessionCount):
                        self._retire(index)
                    elif is_device_fault(exc) or isinstance(exc, HsmUnavailable):
                        self._request_recovery(fault_reason(exc), generation, None)
                elif self.report_fault(exc, ws):
                    ws = None
                job.future.set_exception(translate(exc, job.what))
            else:
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._busy -= 1
                    if self._busy == 0:
                        self._cond.notify_all()

    def _new_session(self, generation: int, seen: set[ObjectKey]) -> WorkerSession:
        identity, capabilities = self._conn.identity, self._conn.capabilities
        assert identity is not None and capabilities is not None, "a worker runs only once connected"
        return WorkerSession(self._conn.open_session(), identity, generation, seen, capabilities)

    # --- recovery ------------------------------------------------------------------------------

    def _request_recovery(self, reason: str, generation: int, change: str | None) -> None:
        with self._cond:
            if self._stopping or generation != self._generation or self._recover_requested:
                return
            self._recover_requested = True
            self._change = change
            self._accepting = False
        explained = self._explained(reason)
        log.warning("HSM fault: %s; recovering", explained if explained == reason else f"{explained} ({reason})")
        with self._cond:
            state = self._new_state("degraded", explained)
        self._notify(state)
        self._wake.set()

    def _supervise(self) -> None:
        backoff = Backoff(self.settings.retry_min, self.settings.retry_max)
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                if self._stopping:
                    return
                if not self._recover_requested:
                    continue
                change = self._change
            self._fail_queued(HsmUnavailable(self.unavailable_text("HSM call")))
            if not self._drain():
                continue
            before = self._conn.identity
            try:
                info = self._conn.reconnect()
            except Exception as raw:  # never let the supervisor die: it is the only way back
                exc = translate(raw, "reconnecting to the HSM")
                # A changed token that may not be re-initialised in this process stays unreadable.
                restart = change is not None and not self._conn.reinitialisable
                reason = f"{change}; {exc}" if change is not None else self._explained(str(exc))
                self._set_state("degraded", reason + (_RESTART_TEXT if restart else ""), restart=restart,
                                change=change if restart else None)
                self._wake.wait(backoff.next())  # close() sets it: stop retrying at once
                self._wake.set()                 # and come round again for the next attempt
                continue
            backoff.reset()
            swapped = None
            if before is not None and info.serial != before.serial:
                swapped = f"token serial changed from {before.serial} to {info.serial}"
                log.warning("HSM: %s", swapped)
            if swapped is not None and not self._conn.reinitialisable:
                # The provider's sessions and keys belong to the token that went away.
                self._set_state("degraded", swapped + _RESTART_TEXT, token=(info.label, info.serial),
                                restart=True, change=swapped)
                continue
            self._fit_workers()
            with self._lock:
                self._generation += 1
                self._seen = set()
                self._recover_requested = False
                self._change = None
                self._accepting = True
            self._set_state("ready", None, self._state.recoveries + (1 if self._ever_ready else 0),
                            token=(info.label, info.serial), change=swapped or change)
            self._ever_ready = True
            log.info("HSM ready: token '%s'", info.label)

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
            self._notify(stuck)
        with self._cond:
            while self._busy and not self._stopping:
                self._cond.wait(0.5)
            return not self._stopping

    def _fail_queued(self, error: HsmError) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            job = item[2]
            if job is None:  # the stop signals sort last: nothing queued is left behind them
                self._queue.put(item)
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    # --- state -----------------------------------------------------------------------------------

    def _set_state(self, status: Status, reason: str | None = None, recoveries: int | None = None, *,
                   token: tuple[str, str] | None = None, restart: bool = False,
                   change: str | None = None) -> None:
        self._notify(self._new_state(status, reason, recoveries, token=token, restart=restart,
                                     change=change))

    def _new_state(self, status: Status, reason: str | None = None, recoveries: int | None = None, *,
                   token: tuple[str, str] | None = None, restart: bool = False,
                   change: str | None = None) -> HsmState:
        old = self._state
        label, serial = token if token is not None else (old.token_label, old.token_serial)
        new = HsmState(status, reason, label, serial,
                       recoveries=old.recoveries if recoveries is None else recoveries,
                       restart_required=restart, last_change=change or old.last_change)
        self._state = new
        return new

    def _notify(self, new: HsmState) -> None:
        """Tell the listeners; never with the lock held (a listener may call the HSM)."""
        for fn in list(self._listeners):
            try:
                fn(new)
            except Exception:
                log.exception("HSM state listener failed")


def _refuse_on_event_loop(what: str) -> None:
    if asyncio._get_running_loop() is None:
        return
    raise RuntimeError(f"{what}: a blocking HSM call on the event loop thread; use the async API")
