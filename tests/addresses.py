"""Loopback addresses owned by this test session (one pytest process), so that two runs of the
suite on one machine never meet on an address.

The first use picks a block number N in 1..200 at random and holds it with an exclusive lock
on a marker file in the system temporary directory until the process ends (another session
that picks the same N sees the lock and picks again). The session then owns:

- the hosts 127.N.0.0/16, handed out one at a time by ``host()`` (a test module or fixture
  takes its own): any port on them is this session's, fixed well-known ones (8883, 443)
  included, and ``port(host)`` hands out fresh ones for settings that need a port number;
- a range of ports on 127.0.0.1 itself (``port(LOOPBACK)``), for what is made to listen
  there only (``make run``). The range lies below the kernel's ephemeral ports, so no
  ``bind(port 0)`` anywhere takes one of them either.

A port number is never given out twice in a session, so nothing waits on TIME_WAIT.
Listeners whose port nobody has to know in advance still bind port 0 and are asked for it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import random
import tempfile
import threading
from pathlib import Path

LOOPBACK = "127.0.0.1"
BLOCKS = range(1, 201)
LOOPBACK_PORTS_BASE, LOOPBACK_PORTS_PER_BLOCK = 12_000, 100   # 12,100 .. 32,099: below 32,768
OWN_PORTS = range(20_000, 32_000)                              # on the session's own hosts


class AddressBlock:
    """127.N.0.0/16 and the N-th range of 127.0.0.1 ports, held while `_marker` is locked."""

    def __init__(self, number: int, marker: int) -> None:
        self.number = number
        self.network = ipaddress.ip_network(f"127.{number}.0.0/16")
        self._marker = marker  # the locked file descriptor: open as long as the block is held
        self._lock = threading.Lock()
        self._hosts = self.network.hosts()
        next(self._hosts)  # 127.N.0.1 stays unused
        self._own_ports = iter(OWN_PORTS)
        first = LOOPBACK_PORTS_BASE + (number - 1) * LOOPBACK_PORTS_PER_BLOCK
        self._loopback_ports = iter(range(first, first + LOOPBACK_PORTS_PER_BLOCK))

    def host(self) -> str:
        """A loopback address of this session's that nothing else was given."""
        with self._lock:
            return str(next(self._hosts))

    def port(self, host: str) -> int:
        """A port on `host` (one of `host()`'s, or LOOPBACK) that this session gave out to no one
        before and no other session uses."""
        with self._lock:
            if host == LOOPBACK:
                source = self._loopback_ports
            elif ipaddress.ip_address(host) in self.network:
                source = self._own_ports
            else:
                raise ValueError(f"{host} is not an address of this test session ({self.network})")
            try:
                return next(source)
            except StopIteration:
                raise RuntimeError(f"this test session has used up its ports on {host}") from None

    def __repr__(self) -> str:
        return f"AddressBlock({self.network})"


def _claim() -> AddressBlock:
    directory = Path(tempfile.gettempdir())
    for number in random.sample(BLOCKS, len(BLOCKS)):
        fd = os.open(directory / f"spyrus-hsm-tests-127.{number}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return AddressBlock(number, fd)
    raise RuntimeError(f"every loopback block for tests is taken (lock files in {directory})")


_block: AddressBlock | None = None
_claiming = threading.Lock()


def block() -> AddressBlock:
    """This session's block, claimed on first use."""
    global _block
    with _claiming:
        if _block is None:
            _block = _claim()
        return _block


def host() -> str:
    """A loopback address for one test module or fixture: ``HOST = addresses.host()``."""
    return block().host()


def port(on: str) -> int:
    """A fresh port on `on` for a setting that needs a number (a health or metrics port)."""
    return block().port(on)
