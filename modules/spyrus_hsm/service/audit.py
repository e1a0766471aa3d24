"""The audit log: one JSON line per decision — time, principal, operation, key, device,
outcome, reason — and never a secret (no tokens, signatures, data or PINs are passed in).

Records are written off the event loop by group commit: `submit` queues a record and one writer
thread writes everything queued in one `write` (and, with audit_fsync, one `fsync`), so a slow or
stalled disk delays the writer, never the loop. A caller that must not go on before its record
is on disk (fail_closed, a signature about to be handed out) awaits its batch and gets
`AuditError` when the batch failed: the request gets 503 instead. Every other record is queued
and not waited for; those are bounded (`queue_limit`): past it, new ones are dropped, counted in
`dropped` and logged when dropping starts and ends. `close` writes what is queued, waiting a
bounded time for a disk that does not take it.

Each batch is written all-or-nothing: on a full or failing file system a write can stop part-way
through a line, and the next record appended to that torn line would make both unreadable. So a
batch is one `write` on an O_APPEND descriptor whose count is checked; a short or failed write is
cut back to where the batch began and fails every record in it, and where cutting back is not
possible (or the log is not a regular file) the file is marked torn and the next batch starts on a
new line. A file that does not end in a newline when it is opened (a crash mid-record) is treated
the same way. The file is reopened by name when logrotate moves it; "-" is stderr.

Requests refused before anyone was authenticated (no principal: failed authentication, limited
before authentication, unknown routes) cost an attacker nothing to send, so their records are
aggregated and a flood of them cannot fill the state volume. In each AGGREGATE_INTERVAL (60 s),
the first AGGREGATE_FIRST (5) of them from each source address are written as usual, up to
AGGREGATE_RECORDS (20) from all sources together; the others are counted per (source,
operation, outcome, status, reason), and at the end of the interval (or at `close`) each count
becomes one record with the same fields, `requestId` null, `"count": n` and `"since"`, the time
of the first request counted. Counts are kept for at most AGGREGATE_SOURCES (64) sources per
interval; requests from further sources are counted under the source "*". So an interval writes
at most 20 + 64 x (the few kinds of refusal) + a few records, however many requests were refused;
the counts and the records without one add up to the requests. Records of authenticated
requests stay one per request.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .. import times
from ..errors import Kind, SpyrusError
from ..threads import Worker

log = logging.getLogger(__name__)
QUEUE_LIMIT = 10_000    # records nobody waits for, queued for a slow disk (~3 MB)
MAX_BATCH = 1000        # records per write
CLOSE_TIMEOUT = 2.0     # seconds `close` waits for the disk to take what is queued
WITHHELD_STATUS = 503   # what a caller gets whose answer waited too long for its record
# Records of requests without a principal (see the module docstring): per interval, written whole
AGGREGATE_INTERVAL = 60.0  # seconds
AGGREGATE_FIRST = 5        # per source address
AGGREGATE_RECORDS = 20     # from all sources together
AGGREGATE_SOURCES = 64     # sources counted one by one; the others under "*"
OTHER_SOURCES = "*"


class AuditError(SpyrusError, RuntimeError, kind=Kind.UNAVAILABLE):
    """The audit record could not be written."""


@dataclass(eq=False)
class _Pending:
    line: bytes
    done: asyncio.Future[None] | None  # set when someone awaits the record
    taken: bool = False                # in a batch the writer is writing: too late to change


class AuditLog:
    def __init__(self, path: str, fail_closed: bool, fsync: bool = False, queue_limit: int = QUEUE_LIMIT) -> None:
        self.path = path
        self.fail_closed = fail_closed
        self.fsync = fsync
        self.queue_limit = queue_limit
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._regular = True
        self._torn = False  # the file ends inside a record: begin the next one on a new line
        self._checked = 0.0
        self._lock = threading.Lock()  # the descriptor: writer thread, `record`, `close`
        self.failures = 0
        self.dropped = 0
        self._dropping = False
        # The queue and the writer thread's state, under one lock with two conditions: work
        # wakes the writer, idle wakes `flush`.
        self._queue: deque[_Pending] = deque()
        self._unwaited = 0  # queued records nobody waits for: the bounded ones
        self._busy = False  # the writer is writing a batch
        self._closing = False
        self._state = threading.Lock()
        self._work = threading.Condition(self._state)
        self._idle = threading.Condition(self._state)
        self._writer = Worker("audit-writer", self._run, on_close=self._closing_now)
        self._writer_started = False
        # Aggregation of the records of requests without a principal (under `_state`)
        self.aggregate_interval = AGGREGATE_INTERVAL
        self._interval_end = 0.0            # monotonic
        self._whole: dict[str | None, int] = {}  # source -> records written whole this interval
        self._whole_total = 0
        self._counted: dict[tuple[str | None, str, str, int | None, str], _Count] = {}
        self._counted_sources: set[str | None] = set()

    async def submit(self, *, wait: bool, timeout: float | None = None, **fields: Any) -> None:
        """Queue one record for the writer thread. With wait, return once its batch is written
        (AuditError if that failed or took longer than timeout); without, return at once.

        A record waited for past `timeout` (or whose waiter is cancelled) describes an answer that
        is then not given (the caller gets 503, or nothing): it is rewritten to say so while it is
        still queued, or, when the writer already holds it, followed by a record with the same
        request id that says so."""
        done = asyncio.get_running_loop().create_future() if wait else None
        if done is None and fields.get("principal") is None:
            with self._state:
                if not self._closing and self._counts(fields):
                    if not self._writer_started:
                        self._writer.start()
                        self._writer_started = True
                    self._work.notify()  # the writer writes the counts at the end of the interval
                    return
        pending = _Pending(_line(**fields), done)
        with self._state:
            if self._closing or (done is None and self._unwaited >= self.queue_limit):
                self._drop()
                if done is None:
                    return
                raise AuditError("the audit log is closed")
            if not self._writer_started:
                self._writer.start()
                self._writer_started = True
            self._queue.append(pending)
            self._unwaited += done is None
            self._work.notify()
        if done is not None:
            try:
                await asyncio.wait_for(done, timeout)
            except TimeoutError:
                self._withhold(pending, fields, WITHHELD_STATUS, "withheld", "audit-unavailable")
                raise AuditError(f"the audit log did not take the record within {timeout:g} s") from None
            except asyncio.CancelledError:  # the request was abandoned (shutdown): nothing is sent
                self._withhold(pending, fields, None, "aborted", "cancelled")
                raise

    def _withhold(self, pending: _Pending, fields: dict[str, Any], status: int | None, outcome: str,
                  reason: str) -> None:
        """The record of an answer not given after all, because its record was not written in time."""
        line = _line(**{**fields, "status": status, "outcome": outcome, "reason": reason})
        with self._state:
            if not pending.taken:
                pending.line = line
                return
            self._queue.append(_Pending(line, None))  # beyond queue_limit: it corrects a record
            self._unwaited += 1
            self._work.notify()

    def _counts(self, fields: dict[str, Any]) -> bool:
        """A record of a request without a principal: True if it is counted instead of written
        (under `_state`)."""
        self._roll(time.monotonic())
        remote = fields.get("remote")
        if self._whole_total < AGGREGATE_RECORDS and self._whole.get(remote, 0) < AGGREGATE_FIRST:
            self._whole[remote] = self._whole.get(remote, 0) + 1
            self._whole_total += 1
            return False
        if remote not in self._counted_sources:
            if len(self._counted_sources) >= AGGREGATE_SOURCES:
                remote = OTHER_SOURCES
            self._counted_sources.add(remote)
        key = (remote, str(fields.get("operation")), str(fields.get("outcome")), fields.get("status"),
               str(fields.get("reason")))
        count = self._counted.get(key)
        if count is None:
            count = self._counted[key] = _Count(times.iso(times.now(), "milliseconds"))
        count.n += 1
        return True

    def _roll(self, now: float, force: bool = False) -> None:
        """At the end of an interval (or with force): the counts become records, queued (under
        `_state`)."""
        if not force and now < self._interval_end:
            return
        for (remote, operation, outcome, status, reason), count in self._counted.items():
            line = _line(principal=None, operation=operation, outcome=outcome, reason=reason, status=status,
                         remote=remote, count=count.n, since=count.since)
            self._queue.append(_Pending(line, None))  # beyond queue_limit: a few, standing for many
            self._unwaited += 1
        self._counted.clear()
        self._counted_sources.clear()
        self._whole.clear()
        self._whole_total = 0
        self._interval_end = now + self.aggregate_interval

    def _until_roll(self) -> float | None:
        """Seconds until the counts are due to be written (None: nothing counted)."""
        return max(0.0, self._interval_end - time.monotonic()) if self._counted else None

    def _drop(self) -> None:
        self.dropped += 1
        if not self._dropping and not self._closing:
            self._dropping = True
            log.error("audit log %s: %d records wait for the disk; dropping new ones until they are written",
                      self.path, self._unwaited)

    def _run(self) -> None:
        """The writer thread: everything queued, up to MAX_BATCH records, in one write."""
        while True:
            with self._state:
                while not self._queue and not self._closing:
                    self._roll(time.monotonic())
                    if not self._queue:
                        self._work.wait(self._until_roll())
                if self._closing:
                    self._roll(time.monotonic(), force=True)
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                for p in batch:
                    p.taken = True
                self._unwaited -= sum(p.done is None for p in batch)
                self._busy = True
            error = self._commit(b"".join(p.line for p in batch), len(batch))
            _settle([p.done for p in batch if p.done is not None], error)
            with self._state:
                self._busy = False
                if self._dropping and self._unwaited < self.queue_limit:
                    self._dropping = False
                    log.error("audit log %s: the queue has room again; %d records dropped so far",
                              self.path, self.dropped)
                self._idle.notify_all()

    def flush(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Wait (on a thread other than the loop's) until what is queued is written; False on timeout."""
        with self._state:
            return self._idle.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _commit(self, data: bytes, count: int) -> AuditError | None:
        with self._lock:
            try:
                self._write(data)
            except OSError as exc:
                self.failures += count
                self._close()  # reopened by the next batch, which checks how the file ends
                log.error("audit log %s cannot be written (%s): %d record(s) lost%s", self.path, _reason(exc),
                          count, ": refusing to hand out signatures" if self.fail_closed else "")
                return AuditError(f"the audit log cannot be written ({_reason(exc)})")
        return None

    def _write(self, data: bytes) -> None:
        if self.path == "-":
            sys.stderr.write(data.decode())
            sys.stderr.flush()
            return
        fd = self._open()
        if self._torn:
            data = b"\n" + data
        start = os.lseek(fd, 0, os.SEEK_END) if self._regular else None
        written = os.write(fd, data)  # a failing call writes nothing; a short one returns its count
        if written != len(data):
            self._cut_back(fd, start)
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        self._torn = False
        if self.fsync and self._regular:
            os.fsync(fd)

    def _cut_back(self, fd: int, start: int | None) -> None:
        """Remove what a short write left of its batch; if that fails (or the log is a pipe), the
        file stays torn and the next batch, after reopening, starts on a new line."""
        try:
            if start is None:
                raise OSError(errno.ESPIPE, "not a regular file")
            os.ftruncate(fd, start)
        except OSError:
            self._torn = True

    def _open(self) -> int:
        if self._fd is not None and self._rotated():
            self._close()
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)  # a FIFO: never blocks
            st = os.fstat(fd)
            self._fd, self._inode = fd, (st.st_dev, st.st_ino)
            self._regular = stat.S_ISREG(st.st_mode)
            self._torn = self._regular and st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n"
        return self._fd

    def _rotated(self) -> bool:
        """logrotate moved the file away: reopen by name (looked at once a second at most)."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return False
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._inode

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None

    def _closing_now(self) -> None:
        with self._state:
            self._closing = True
            self._work.notify()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Write what is queued (waiting at most timeout for the disk), then close the file; False
        if the writer is still stuck in a write (it keeps the descriptor)."""
        if not self._writer.close(timeout):
            log.error("audit log %s: the disk took no write for %g s; %d queued records are lost",
                      self.path, timeout, len(self._queue))
            return False
        with self._lock:
            self._close()
        return True


@dataclass(eq=False)
class _Count:
    """Requests of one kind from one source counted instead of written, this interval."""
    since: str  # the time of the first
    n: int = 0


def _line(*, principal: str | None, operation: str, outcome: str, reason: str, key: str | None = None,
          device: str | None = None, status: int | None = None, request_id: str | None = None,
          remote: str | None = None, count: int | None = None, since: str | None = None) -> bytes:
    entry: dict[str, Any] = {
        "time": times.iso(times.now(), "milliseconds"),
        "principal": principal, "operation": operation, "key": key, "device": device,
        "outcome": outcome, "reason": reason, "status": status, "requestId": request_id, "remote": remote,
    }
    if count is not None:  # one record standing for `count` requests (see the module docstring)
        entry["count"], entry["since"] = count, since
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode()


def _settle(waiting: list[asyncio.Future[None]], error: AuditError | None) -> None:
    """Tell the requests awaiting a batch how it went, on their loops (one wake-up per loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for future in waiting:
        by_loop.setdefault(future.get_loop(), []).append(future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _resolve(futures: list[asyncio.Future[None]], error: AuditError | None) -> None:
    for future in futures:
        if future.done():  # given up (timeout, request cancelled)
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(AuditError(str(error)))


def _reason(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, exc.__class__.__name__) if exc.errno else exc.__class__.__name__
