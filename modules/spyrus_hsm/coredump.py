"""No core dump of the process that holds the API's short-lived private key and the token's PIN.

A core dump would write the process's memory to disk (or hand it to a crash collector such as
systemd-coredump or apport): the in-memory TLS key, the logged-in session, the PIN read from its
file. `serve` calls `disable()` first: the process is made non-dumpable (PR_SET_DUMPABLE 0, which
also keeps other processes of the same user from ptrace-attaching to it or reading its
/proc/<pid>/mem) and its core size limit is set to zero, soft and hard, so neither it nor
anything it starts can raise it again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

log = logging.getLogger(__name__)
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def disable() -> None:
    """Make this process non-dumpable and its core size limit 0 (a failure is logged, not raised:
    the module still runs where the kernel refuses, e.g. under a seccomp profile that forbids prctl)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("could not set the core size limit to 0: %s", exc)
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the process non-dumpable (prctl PR_SET_DUMPABLE): errno %d", ctypes.get_errno())


def dumpable() -> bool:
    """Whether this process may dump core (prctl PR_GET_DUMPABLE)."""
    return bool(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
