"""The audit log: one JSON line per decision — time, principal, operation, key, device,
outcome, reason — and never a secret (no tokens, signatures, data or PINs are passed in).

With fail_closed, a signature whose audit record could not be written is not handed out: the
request gets 503 instead (`AuditError`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import threading
import time
from typing import IO, Any

log = logging.getLogger(__name__)


class AuditError(RuntimeError):
    """The audit record could not be written."""


class AuditLog:
    def __init__(self, path: str, fail_closed: bool) -> None:
        self.path = path
        self.fail_closed = fail_closed
        self._file: IO[str] | None = None
        self._inode: tuple[int, int] | None = None
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
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        try:
            with self._lock:
                handle = self._handle()
                handle.write(line)
                handle.flush()
        except (OSError, ValueError) as exc:
            self.failures += 1
            self._close()
            log.error("audit log %s cannot be written (%s)%s", self.path, exc.__class__.__name__,
                      ": refusing to hand out signatures" if self.fail_closed else "")
            if self.fail_closed:
                raise AuditError(f"the audit log cannot be written ({exc.__class__.__name__})") from None

    def _handle(self) -> IO[str]:
        if self.path == "-":
            return sys.stderr
        if self._file is not None and self._rotated():
            self._close()
        if self._file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
            st = os.fstat(fd)
            self._inode = (st.st_dev, st.st_ino)
        return self._file

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
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None

    def close(self) -> None:
        with self._lock:
            self._close()
