"""The audit log: one JSON line per decision — time, principal, operation, key, device,
outcome, reason — and never a secret (no tokens, signatures, data or PINs are passed in).

With fail_closed, a signature whose audit record could not be written is not handed out: the
request gets 503 instead (`AuditError`).

Each record is written all-or-nothing: on a full or failing file system a write can stop part-way
through a line, and the next record appended to that torn line would make both unreadable. So a
record is one `write` on an O_APPEND descriptor whose count is checked; a short or failed write is
cut back to where the record began, and where that is not possible the file is marked torn and
the next record starts on a new line. A file that does not end in a newline when it is opened
(a crash mid-record) is treated the same way.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from ..errors import Kind, SpyrusError

log = logging.getLogger(__name__)


class AuditError(SpyrusError, RuntimeError, kind=Kind.UNAVAILABLE):
    """The audit record could not be written."""


class AuditLog:
    def __init__(self, path: str, fail_closed: bool) -> None:
        self.path = path
        self.fail_closed = fail_closed
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._torn = False  # the file ends inside a record: begin the next one on a new line
        self._checked = 0.0
        self._lock = threading.Lock()
        self.failures = 0

    def record(self, *, principal: str | None, operation: str, outcome: str, reason: str,
               key: str | None = None, device: str | None = None, status: int | None = None,
               request_id: str | None = None, remote: str | None = None) -> None:
        """Write one record; raises AuditError when it fails and fail_closed is set."""
        entry: dict[str, Any] = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "principal": principal, "operation": operation, "key": key, "device": device,
            "outcome": outcome, "reason": reason, "status": status, "requestId": request_id, "remote": remote,
        }
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                self._write(line)
        except OSError as exc:
            self.failures += 1
            self._close()  # reopened by the next record, which checks how the file ends
            log.error("audit log %s cannot be written (%s)%s", self.path, _reason(exc),
                      ": refusing to hand out signatures" if self.fail_closed else "")
            if self.fail_closed:
                raise AuditError(f"the audit log cannot be written ({_reason(exc)})") from None

    def _write(self, line: bytes) -> None:
        if self.path == "-":
            sys.stderr.write(line.decode())
            sys.stderr.flush()
            return
        fd = self._open()
        data = b"\n" + line if self._torn else line
        start = os.lseek(fd, 0, os.SEEK_END)
        written = os.write(fd, data)  # a failing call writes nothing; a short one returns its count
        if written != len(data):
            self._cut_back(fd, start)
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        self._torn = False

    def _cut_back(self, fd: int, start: int) -> None:
        """Remove what a short write left of its record; if that fails, the file stays torn and
        the next record, after reopening, starts on a new line."""
        try:
            os.ftruncate(fd, start)
        except OSError:
            self._torn = True

    def _open(self) -> int:
        if self._fd is not None and self._rotated():
            self._close()
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            st = os.fstat(fd)
            self._fd, self._inode = fd, (st.st_dev, st.st_ino)
            self._torn = st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n"
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

    def close(self) -> None:
        with self._lock:
            self._close()


def _reason(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, exc.__class__.__name__) if exc.errno else exc.__class__.__name__
