"""What pcscd sees: readers and cards, through libpcsclite (ctypes), and what to fix when it
cannot tell.

A CCID token (the Rosetta USB) is a card in a reader; its vendor PKCS#11 library reaches it
through pcscd. When the token is missing, PKCS#11 only says CKR_TOKEN_NOT_PRESENT; PC/SC says
which reader lost its card, that there is no reader at all, or that pcscd cannot be reached or
refuses this uid. Every call here opens its own PC/SC context (a few round trips on a Unix
socket), so it is safe from any thread; none of it may run on the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

DEFAULT_SOCKET = "/run/pcscd/pcscd.comm"

# pcsc-lite's winscard types on Linux: LONG and DWORD are C long / unsigned long.
_LONG = ctypes.c_long
_DWORD = ctypes.c_ulong
_SCOPE_SYSTEM = 2
_MAX_ATR_SIZE = 33
_STATE_UNAWARE = 0x0
_SHARE_SHARED = 2
_PROTOCOL_ANY = 0x3  # T=0 | T=1
_LEAVE_CARD = 0
_STATE_UNKNOWN = 0x4
_STATE_UNAVAILABLE = 0x8
_STATE_PRESENT = 0x20
_STATE_MUTE = 0x200

SUCCESS = 0x0
E_NO_SERVICE = 0x8010001D
E_SERVICE_STOPPED = 0x8010001E
E_NO_READERS_AVAILABLE = 0x8010002E
E_NO_ACCESS = 0x80100027
E_UNKNOWN_READER = 0x80100009
E_INSUFFICIENT_BUFFER = 0x80100008
E_PROTO_MISMATCH = 0x8010000F
W_SECURITY_VIOLATION = 0x8010006A


class _ReaderState(ctypes.Structure):
    _fields_ = [("szReader", ctypes.c_char_p), ("pvUserData", ctypes.c_void_p),
                ("dwCurrentState", _DWORD), ("dwEventState", _DWORD), ("cbAtr", _DWORD),
                ("rgbAtr", ctypes.c_ubyte * _MAX_ATR_SIZE)]


@dataclass(frozen=True)
class Reader:
    name: str
    card: bool  # a card is in the reader (present and answering)


@dataclass(frozen=True)
class Survey:
    """What pcscd reports, or `problem`: why it could not be asked (what to fix)."""
    readers: tuple[Reader, ...] = ()
    problem: str | None = None

    @property
    def with_card(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.readers if r.card)

    def describe(self) -> str:
        if self.problem:
            return self.problem
        return "; ".join(f"reader '{r.name}': {'card present' if r.card else 'no card'}" for r in self.readers)


def socket_path() -> str:
    """The socket libpcsclite connects to (pcsc-lite honours PCSCLITE_CSOCK_NAME)."""
    return os.environ.get("PCSCLITE_CSOCK_NAME") or DEFAULT_SOCKET


_lib: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(ctypes.util.find_library("pcsclite") or "libpcsclite.so.1")
        lib.SCardEstablishContext.argtypes = [_DWORD, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_LONG)]
        lib.SCardReleaseContext.argtypes = [_LONG]
        lib.SCardListReaders.argtypes = [_LONG, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_DWORD)]
        lib.SCardGetStatusChange.argtypes = [_LONG, _DWORD, ctypes.POINTER(_ReaderState), _DWORD]
        lib.SCardConnect.argtypes = [_LONG, ctypes.c_char_p, _DWORD, _DWORD, ctypes.POINTER(_LONG),
                                     ctypes.POINTER(_DWORD)]
        lib.SCardDisconnect.argtypes = [_LONG, _DWORD]
        for fn in (lib.SCardEstablishContext, lib.SCardReleaseContext, lib.SCardListReaders,
                   lib.SCardGetStatusChange, lib.SCardConnect, lib.SCardDisconnect):
            fn.restype = _LONG
        _lib = lib
    return _lib


def _code(rv: int) -> int:
    return rv & 0xFFFFFFFF


def unreachable_text(path: str | None = None) -> str:
    path = path or socket_path()
    if not os.path.exists(path):
        return (f"pcscd not reachable at {path} (no socket): with hsm.pcscd: host bind the host's /run/pcscd "
                "into the container and check that pcscd runs on the host (systemctl status pcscd.socket); "
                "with internal, see the module's log for pcscd's own errors")
    if not os.access(path, os.R_OK | os.W_OK):
        return f"pcscd not reachable at {path}: uid {os.getuid()} may not open the socket"
    return (f"pcscd not reachable at {path}: the socket is there but pcscd does not answer (stopped; refusing "
            f"uid {os.getuid()} by polkit; or speaking another pcsc-lite protocol version than this image's "
            "libpcsclite; see README, PC/SC)")


def explain_code(rv: int) -> str:
    """What to fix for a PC/SC error code (as libpcsclite returned it)."""
    code = _code(rv)
    if code in (E_NO_SERVICE, E_SERVICE_STOPPED):
        return unreachable_text()
    if code in (E_NO_ACCESS, W_SECURITY_VIOLATION):
        return (f"access denied by polkit for uid {os.getuid()}: allow org.debian.pcsc-lite.access_pcsc and "
                "access_card for it on the host (see README, PC/SC)")
    if code == E_PROTO_MISMATCH:
        return (f"pcscd at {socket_path()} speaks another pcsc-lite protocol version than this image's "
                "libpcsclite; use hsm.pcscd: internal, or a host pcscd of the same protocol (see README, PC/SC)")
    if code == E_NO_READERS_AVAILABLE:
        return "no reader: is the token plugged in and passed through?"
    return f"PC/SC error 0x{code:08X}"


def survey() -> Survey:
    """Readers and cards as pcscd sees them now; never raises."""
    try:
        lib = _library()
    except OSError:
        return Survey(problem="libpcsclite.so.1 cannot be loaded: install libpcsclite1")
    ctx = _LONG(0)
    rv = lib.SCardEstablishContext(_SCOPE_SYSTEM, None, None, ctypes.byref(ctx))
    if rv != SUCCESS:
        return Survey(problem=explain_code(rv))
    try:
        names = _list_readers(lib, ctx)
        if isinstance(names, int):
            return Survey(problem=explain_code(names))
        states = (_ReaderState * len(names))()
        encoded = [n.encode() for n in names]
        for st, name in zip(states, encoded, strict=True):
            st.szReader = name
            st.dwCurrentState = _STATE_UNAWARE
        rv = lib.SCardGetStatusChange(ctx, 0, states, len(names))
        if rv != SUCCESS:
            return Survey(problem=explain_code(rv))
        return Survey(tuple(Reader(n, _has_card(st.dwEventState)) for n, st in zip(names, states, strict=True)))
    finally:
        lib.SCardReleaseContext(ctx)


def card_access(reader: str) -> str | None:
    """Why this uid may not use the card in `reader` (polkit's access_card is checked when a
    client connects to a card), or None when a shared connection works."""
    try:
        lib = _library()
    except OSError:
        return "libpcsclite.so.1 cannot be loaded: install libpcsclite1"
    ctx = _LONG(0)
    rv = lib.SCardEstablishContext(_SCOPE_SYSTEM, None, None, ctypes.byref(ctx))
    if rv != SUCCESS:
        return explain_code(rv)
    try:
        card, protocol = _LONG(0), _DWORD(0)
        rv = lib.SCardConnect(ctx, reader.encode(), _SHARE_SHARED, _PROTOCOL_ANY, ctypes.byref(card),
                              ctypes.byref(protocol))
        if rv == SUCCESS:
            lib.SCardDisconnect(card, _LEAVE_CARD)
            return None
        return explain_code(rv)
    finally:
        lib.SCardReleaseContext(ctx)


def _has_card(state: int) -> bool:
    return bool(state & _STATE_PRESENT) and not state & (_STATE_MUTE | _STATE_UNAVAILABLE | _STATE_UNKNOWN)


def _list_readers(lib: ctypes.CDLL, ctx: ctypes.c_long) -> list[str] | int:
    """Reader names, or the PC/SC error code."""
    for _ in range(3):  # a reader plugged in between the two calls makes the buffer short
        size = _DWORD(0)
        rv = lib.SCardListReaders(ctx, None, None, ctypes.byref(size))
        if rv != SUCCESS:
            return int(rv)
        buf = ctypes.create_string_buffer(size.value)
        rv = lib.SCardListReaders(ctx, None, buf, ctypes.byref(size))
        if _code(rv) == E_INSUFFICIENT_BUFFER:
            continue
        if rv != SUCCESS:
            return int(rv)
        return [n.decode(errors="replace") for n in buf.raw[:size.value].split(b"\0") if n]
    return E_INSUFFICIENT_BUFFER
