"""The async way into the HSM pool: never touches PKCS#11 on the event loop.

Concurrent requests made in the same loop iteration are batched into worker jobs, so a burst
costs one thread wake-up per batch rather than one per request; each request keeps its own
admission, timeout and contextvars. Background requests (`background=True`: work nobody is
waiting for) go one per job at the pool's background priority, so a request that arrives
later waits for at most the one background operation already running. Built only on the
pool's public methods.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TypeVar, cast

from .errors import HsmBusy, HsmTimeout, HsmUnavailable
from .faults import translate
from .operations import WorkerSession
from .pool import BACKGROUND, URGENT, HsmPool

T = TypeVar("T")
MAX_BATCH = 32
# A worker job gathers requests until it holds about this much HSM work: fast tokens amortise
# the thread hand-off over many requests, slow tokens spread a burst over all workers.
BATCH_WORK_SECONDS = 0.0005

# One request's outcome from the worker: (True, value) or (False, error or None if cancelled).
_Outcome = tuple[bool, object]


@dataclass
class _Request:
    """One async request waiting in a batch."""
    fn: Callable[[WorkerSession], object]
    what: str
    future: asyncio.Future[object]
    ctx: contextvars.Context
    background: bool


class AsyncRunner:
    """`run` awaits an operation on the pool's workers from any event loop."""

    def __init__(self, pool: HsmPool) -> None:
        self._pool = pool
        self._batchers: dict[asyncio.AbstractEventLoop, _Batcher] = {}
        self.op_seconds = 0.001  # moving average of one operation's duration, sizes batches

    async def run(self, fn: Callable[[WorkerSession], T], what: str, timeout: float | None = None,
                  background: bool = False) -> T:
        limit = self._pool.settings.call_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _Batcher(self, loop)
        try:
            self._pool.admit(what, background=background)
        except HsmBusy as exc:
            drain = self._pool.queue_depth() * self.op_seconds / self._pool.workers
            raise HsmBusy(str(exc), drain_seconds=drain) from None
        fut = batcher.add(fn, what, background)
        try:
            return await asyncio.wait_for(cast("asyncio.Future[T]", fut), limit)
        except TimeoutError:
            raise HsmTimeout(f"{what}: the HSM did not answer within {limit:g} s") from None

    def run_batch(self, batch: list[_Request], ws: WorkerSession) -> list[_Outcome]:
        """On a worker: run a batch; a device fault fails the rest of the batch at once."""
        results: list[_Outcome] = []
        started = time.perf_counter()
        for i, req in enumerate(batch):
            if req.future.cancelled():
                results.append((False, None))
                continue
            try:
                results.append((True, req.ctx.run(req.fn, ws)))
            except BaseException as exc:
                results.append((False, translate(exc, req.what)))
                if self._pool.report_fault(exc, ws):
                    gone = HsmUnavailable(self._pool.unavailable_text(req.what))
                    results += [(False, gone)] * (len(batch) - i - 1)
                    break
        per_op = (time.perf_counter() - started) / len(batch)
        self.op_seconds += 0.2 * (per_op - self.op_seconds)
        return results


class _Batcher:
    """Collects one event loop's HSM requests and hands them to workers in batches."""

    def __init__(self, runner: AsyncRunner, loop: asyncio.AbstractEventLoop) -> None:
        self.runner = runner
        self.pool = runner._pool
        self.loop = loop
        self.pending: list[_Request] = []

    def add(self, fn: Callable[[WorkerSession], object], what: str, background: bool = False) -> asyncio.Future[object]:
        fut = self.loop.create_future()
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(_Request(fn, what, fut, contextvars.copy_context(), background))
        return fut

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        urgent = [req for req in batch if not req.background]
        spread = -(-len(urgent) // self.pool.workers)
        amortise = int(BATCH_WORK_SECONDS / max(self.runner.op_seconds, 1e-6))
        size = max(1, min(MAX_BATCH, max(spread, amortise)))
        chunks = [(urgent[i:i + size], URGENT) for i in range(0, len(urgent), size)]
        chunks += [([req], BACKGROUND) for req in batch if req.background]
        for n, (chunk, priority) in enumerate(chunks):
            try:
                job = self.pool.dispatch(partial(self.runner.run_batch, chunk), chunk[0].what, priority)
            except BaseException as exc:  # never leave a caller waiting on a lost batch
                lost = [req for rest, _ in chunks[n:] for req in rest]
                self.pool.release(len(lost))
                for req in lost:
                    if not req.future.done():
                        req.future.set_exception(translate(exc, req.what))
                return
            job.add_done_callback(partial(self._resolve_threadsafe, chunk))

    def _resolve_threadsafe(self, chunk: list[_Request], job: Future[list[_Outcome]]) -> None:
        self.loop.call_soon_threadsafe(self._resolve, chunk, job)

    def _resolve(self, chunk: list[_Request], job: Future[list[_Outcome]]) -> None:
        self.pool.release(len(chunk))
        exc = job.exception()
        results: list[_Outcome] = [(False, exc)] * len(chunk) if exc is not None else job.result()
        for req, (ok, value) in zip(chunk, results, strict=True):
            if req.future.done():
                continue
            if ok:
                req.future.set_result(value)
            elif isinstance(value, BaseException):
                req.future.set_exception(value)
            else:
                req.future.set_exception(HsmUnavailable(req.what))

