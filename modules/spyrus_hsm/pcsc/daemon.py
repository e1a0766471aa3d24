"""pcscd as a child of `serve` (`hsm.pcscd: internal`): started in the foreground, its log lines
forwarded into ours at their own level, restarted with backoff when it dies, stopped with us.

pcscd marks each line's level only by colour (`--color`): red critical, magenta error, blue
info, plain debug; the colour is how the level is read back. The child is exec'ed straight
away (subprocess, no Python in between), so starting it after the PKCS#11 module is loaded
does not run the module in a forked copy of this process.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence

from ..backoff import Backoff
from ..threads import Worker

log = logging.getLogger("spyrus_hsm.pcscd")

RUN_DIR = "/run/pcscd"
BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a pcscd that ran this long resets the backoff
STOP_WAIT = 3.0      # of the 10 s edgeAgent allows the module to stop

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LINE = re.compile(r"^\s*(?:\x1b\[36m)?\d+(?:\x1b\[0m)?\s+(?:\[\d+\]\s+)?(?P<rest>.*)$")
_LEVELS = {"01;31": logging.CRITICAL, "31": logging.CRITICAL, "35": logging.ERROR, "34": logging.INFO}


def default_argv() -> list[str]:
    exe = shutil.which("pcscd") or ("/usr/sbin/pcscd" if os.path.exists("/usr/sbin/pcscd") else "pcscd")
    return [exe, "--foreground", "--color", "--info"]


def parse_line(raw: str) -> tuple[int, str]:
    """(level, text) of one line of pcscd's coloured foreground log."""
    m = _LINE.match(raw)
    rest = m.group("rest") if m else raw
    colour = re.match(r"\x1b\[([0-9;]*)m", rest)
    level = _LEVELS.get(colour.group(1), logging.DEBUG) if colour else logging.DEBUG
    return level, _ANSI.sub("", rest).strip()


class Pcscd:
    def __init__(self, argv: Sequence[str] | None = None) -> None:
        self.argv = list(argv or default_argv())
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._worker = Worker("pcscd", self._supervise)
        self._stopping = self._worker.stop_event

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> Pcscd:
        self._worker.start()
        return self

    def _supervise(self) -> None:
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self._run_once()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STABLE_AFTER:
                backoff.reset()
            delay = backoff.next()
            log.error("pcscd exited (%s); restarting it in %g s", code, delay)
            if self._stopping.wait(delay):
                return

    def _run_once(self) -> str:
        """Run pcscd until it exits; returns how it ended."""
        if not os.access(RUN_DIR, os.W_OK) and not os.access(os.path.dirname(RUN_DIR), os.W_OK):
            log.error("pcscd cannot create its socket: %s is not writable by uid %d", RUN_DIR, os.getuid())
        try:
            with self._lock:
                if self._stopping.is_set():
                    return "not started"
                self._proc = subprocess.Popen(  # noqa: S603 - argv is fixed, no shell
                    self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, errors="replace", start_new_session=True)  # our SIGTERM handling stops it
        except OSError as exc:
            return f"cannot start {self.argv[0]}: {exc.strerror}"
        proc = self._proc
        log.info("pcscd started (pid %d)", proc.pid)
        assert proc.stdout is not None
        for raw in proc.stdout:
            level, text = parse_line(raw.rstrip("\n"))
            if text:
                log.log(level, "%s", text)
        code = proc.wait()
        return f"signal {-code}" if code < 0 else f"exit code {code}"

    def stop(self, timeout: float = STOP_WAIT) -> bool:
        """Stop pcscd and the thread that restarts it; True once that thread has ended."""
        with self._lock:  # no pcscd is started after this
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("pcscd did not stop within %g s; killing it", timeout)
                proc.kill()
                proc.wait()
        return self._worker.close(timeout)
