"""A real PC/SC rig for tests: pcscd with Debian's virtual reader driver (vsmartcard-vpcd: readers
"Virtual PCD 00 00" and "… 00 01", fed over TCP 35963/35964) and a card emulator (vsmartcard-vpicc's
`vicc`) to insert (start it) and pull (stop it).

Two packaging bugs of bookworm's vsmartcard are worked around here: its Python package sits in
/usr/lib/python3/site-packages/virtualsmartcard (put on PYTHONPATH; Debian's python3 runs it) and
CryptoUtils falls back to `import sha` (a one-line sha.py beside it satisfies that).

pcscd (/run/pcscd) and its readers' ports are one per machine, unlike the loopback addresses a
test session owns (tests/addresses.py): `HostPcscd.start()` and a `VirtualCard` whose reader is in
this machine's pcscd (serve's own included) first take a machine-wide lock,
waiting while another test session's test has it, and the test session releases it when the
test ends (`release_machine_pcscd`, called by tests/conftest.py).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from waiting import wait_for

from spyrus_hsm.pcsc import scard

READER = "Virtual PCD 00 00"
VPCD_PORT = 35963  # /etc/reader.conf.d/vpcd: the first virtual reader
SOCKET = "/run/pcscd/pcscd.comm"
VICC_PATH = "/usr/lib/python3/site-packages/virtualsmartcard"
GUARD = 20.0  # seconds; only so that a rig that never comes up fails instead of hanging
MACHINE_WAIT = 90.0  # seconds a test waits for another test session's test to give pcscd up
_machine_lock: int | None = None  # the locked file descriptor while this session's test has pcscd


def wait_until(cond: Callable[[], bool], what: str, within: float = GUARD) -> None:
    wait_for(cond, within, what, every=0.05)


def _take_machine_pcscd() -> None:
    global _machine_lock
    if _machine_lock is not None:
        return
    fd = os.open(os.path.join(tempfile.gettempdir(), "spyrus-hsm-tests-pcscd.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    end = time.monotonic() + MACHINE_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= end:
                os.close(fd)
                raise AssertionError(f"another test session kept this machine's pcscd for {MACHINE_WAIT} s") from None
            time.sleep(0.2)
            continue
        _machine_lock = fd
        return


def release_machine_pcscd() -> None:
    """At the end of a test: let other test sessions run pcscd (a no-op unless this one did)."""
    global _machine_lock
    if _machine_lock is not None:
        os.close(_machine_lock)  # closing the only descriptor releases the lock
        _machine_lock = None


def missing_tools() -> list[str]:
    need = ["/usr/sbin/pcscd", "/usr/bin/vicc", "/usr/lib/pcsc/drivers/serial/libifdvpcd.so", VICC_PATH]
    return [p for p in need if not os.path.exists(p)]


class HostPcscd:
    """pcscd run by the test, as a host's would be (root, /run/pcscd)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HostPcscd:
        _take_machine_pcscd()
        if scard.survey().problem is None:
            raise AssertionError(f"a pcscd already answers at {SOCKET}; stop it (systemctl stop pcscd.socket "
                                 "pcscd) so the tests can run their own")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(["/usr/sbin/pcscd", "--foreground", "--info"], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: bool(scard.survey().readers), "pcscd answering with its virtual readers")
        return self

    def kill(self) -> None:
        """SIGKILL: pcscd gone without cleaning up, as after a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class VirtualCard:
    """The card emulator: inserted while `vicc` runs and is connected to the reader."""

    def __init__(self, workdir: Path, *, host: str = "localhost", port: int = VPCD_PORT,
                 check_locally: bool = True) -> None:
        self.workdir = workdir
        self.host, self.port = host, port
        self.check_locally = check_locally  # the reader is in this machine's pcscd
        if check_locally:  # that pcscd (the test's own or serve's) and the reader's port are one per machine
            _take_machine_pcscd()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "sha.py").write_text("import hashlib\nnew = hashlib.sha1\n")

    def insert(self) -> None:
        env = dict(os.environ, PYTHONPATH=f"{VICC_PATH}:{self.workdir}")
        with (self.workdir / "vicc.log").open("ab") as out:
            self.proc = subprocess.Popen(["/usr/bin/python3", "/usr/bin/vicc", "-t", "iso7816",
                                          "-H", self.host, "-P", str(self.port)],
                                         env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if self.check_locally:
            wait_until(lambda: READER in scard.survey().with_card, f"a card in '{READER}'")

    def pull(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        if self.check_locally:
            wait_until(lambda: READER not in scard.survey().with_card, f"the card out of '{READER}'")

    def forget(self) -> None:
        """vicc exits by itself when pcscd goes away; reap it."""
        if self.proc is not None:
            self.proc.wait(10)
            self.proc = None
