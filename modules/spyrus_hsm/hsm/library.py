"""Loading a PKCS#11 module, finding the token (by label or serial, never slot id), logging in.

Login is per token, not per session: one long-lived logged-in session is kept and
CKR_USER_ALREADY_LOGGED_IN counts as success. Worker sessions are opened without a PIN and
share that login; closing them does not log the token out.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, ObjectClass, TokenFlag, _pkcs11
from pkcs11.attributes import AttributeMapper
from pkcs11.types import Session, Slot, Token

from .capabilities import Capabilities, Need
from .capabilities import read as read_capabilities
from .errors import DuplicateObject, HsmConfigError, HsmUnavailable, LoginFailed, TokenNotFound
from .faults import translate
from .secret import Secret


@dataclass(frozen=True)
class TokenSelector:
    label: str | None = None
    serial: str | None = None

    def describe(self) -> str:
        parts = [f"label '{self.label}'" if self.label else "", f"serial '{self.serial}'" if self.serial else ""]
        return " and ".join(p for p in parts if p) or "any token"


@dataclass(frozen=True)
class TokenSummary:
    label: str
    serial: str
    manufacturer: str
    model: str
    initialized: bool


def load_module(path: str) -> _LockingLib:
    """Load (or return the already loaded) PKCS#11 module at `path`."""
    if not Path(path).is_file():
        raise HsmConfigError(
            f"PKCS#11 module {path} does not exist; install the vendor library or set "
            "SPYRUS_HSM_PKCS11_MODULE (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
        )
    if not os.access(path, os.R_OK):
        raise HsmConfigError(f"PKCS#11 module {path} is not readable by uid {os.getuid()}")
    try:
        if path not in _LIBS:
            lib = _LockingLib(path)
            # Never freed: at interpreter exit the object can outlive its class (torn down by
            # the final garbage collection), and python-pkcs11's lib.__dealloc__ then cannot
            # find `unload` and reports it through a sys.excepthook already gone ("Error in
            # sys.excepthook" on exit). Nothing is lost: its C_Finalize would be skipped (the
            # module is initialised through Cryptoki), and the OS unloads the module at exit.
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(lib))
            _LIBS[path] = lib
        return _LIBS[path]
    except p11e.PKCS11Error as exc:
        raise HsmConfigError(
            f"PKCS#11 module {path} failed to initialise ({exc or type(exc).__name__}); "
            "for SoftHSM2 check SOFTHSM2_CONF and that its token directory exists and is writable"
        ) from None
    except OSError as exc:
        raise HsmConfigError(f"PKCS#11 module {path} cannot be loaded: {exc}") from None


def summarise(token: Token) -> TokenSummary:
    return TokenSummary(
        label=token.label,
        serial=_serial_text(token.serial),
        manufacturer=token.manufacturer_id,
        model=token.model,
        initialized=bool(token.flags & TokenFlag.TOKEN_INITIALIZED),
    )


def list_tokens(lib: _pkcs11.lib) -> list[TokenSummary]:
    out = []
    for slot in present_slots(lib):
        try:
            out.append(summarise(slot.get_token()))
        except p11e.PKCS11Error:
            continue  # a slot whose token vanished between the two calls
    return out


def find_token(lib: _pkcs11.lib, selector: TokenSelector) -> Token:
    """The one initialised token matching `selector`; a clear error listing what is there."""
    matches = []
    unreadable = 0
    try:
        slots = present_slots(lib)
    except p11e.PKCS11Error as exc:
        raise translate(exc, "listing HSM slots") from None
    for slot in slots:
        try:
            token = slot.get_token()
        except (p11e.TokenNotPresent, p11e.DeviceRemoved, p11e.TokenNotRecognised):
            continue
        except p11e.PKCS11Error:
            unreadable += 1  # e.g. SoftHSM2 whose token directory went away: GENERAL_ERROR
            continue
        info = summarise(token)
        if not info.initialized:
            continue
        if selector.label is not None and info.label != selector.label:
            continue
        if selector.serial is not None and info.serial != selector.serial:
            continue
        matches.append(token)
    if len(matches) == 1:
        return matches[0]
    present = [t for t in list_tokens(lib) if t.initialized]
    listing = ", ".join(f"'{t.label}' (serial {t.serial})" for t in present) or "none"
    if unreadable:
        listing += f"; {unreadable} slot(s) whose token information cannot be read"
    if not matches:
        raise TokenNotFound(
            f"token with {selector.describe()} not found; tokens present: {listing}; "
            "check SPYRUS_HSM_TOKEN_LABEL (or hsm.token_label in the config), that the HSM "
            "is plugged in, or create one with 'spyrus-hsm token init'"
        )
    raise DuplicateObject(
        f"{len(matches)} tokens match {selector.describe()} ({listing}); "
        "select one by serial (hsm.token_serial)"
    )


def login(token: Token, pin: Secret) -> Session:
    """A read-write session logged in as the user; ALREADY_LOGGED_IN counts as success."""
    try:
        return token.open(rw=True, user_pin=pin.reveal_str(), attribute_mapper=attribute_mapper())
    except p11e.UserAlreadyLoggedIn:
        # python-pkcs11 opened a session before C_Login failed; the login state is the
        # token's, so a plain session here is already in the user state.
        return open_session(token)
    except (p11e.PinIncorrect, p11e.PinLocked, p11e.PinExpired, p11e.PinLenRange,
            p11e.UserPinNotInitialized) as exc:
        err = translate(exc, "logging in")
        raise LoginFailed(f"token '{token.label}': {err}",
                          pin_refused=not isinstance(err, LoginFailed) or err.pin_refused,
                          pin_incorrect=isinstance(exc, p11e.PinIncorrect)) from None
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"logging in to token '{token.label}'") from None


def attribute_mapper() -> AttributeMapper:
    """python-pkcs11's mapper plus CKA_CERTIFICATE_CATEGORY (a CK_ULONG) it does not know."""
    mapper = AttributeMapper()
    ulong = struct.Struct("L")
    mapper.register_handler(Attribute.CERTIFICATE_CATEGORY, ulong.pack,
                            lambda raw: ulong.unpack(raw)[0])
    return mapper


def open_session(token: Token) -> Session:
    try:
        return token.open(rw=True, attribute_mapper=attribute_mapper())
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"opening a session on token '{token.label}'") from None


def finalize_quietly(lib: _pkcs11.lib) -> None:
    """C_Finalize, ignoring its result: only when no other thread is inside a PKCS#11 call."""
    lib.finalize()


def initialize(lib: _pkcs11.lib) -> None:
    try:
        lib.initialize()
    except HsmConfigError as exc:
        raise HsmUnavailable(str(exc)) from None


def _serial_text(serial: bytes) -> str:
    return serial.decode("ascii", "replace").strip().strip("\x00")


# --- the module's own function list --------------------------------------------------------
# python-pkcs11 calls C_Initialize(NULL), which by the PKCS#11 spec promises that no two threads
# call the library at once; SoftHSM then disables its mutexes and crashes under concurrent
# sessions. We initialise with CKF_OS_LOCKING_OK ourselves and reach C_InitToken (which
# python-pkcs11 lacks) through the same function list.

_CKF_OS_LOCKING_OK = 0x2
_CKR_OK = 0
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
_CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
_CKR_PIN_INCORRECT = 0xA0
_CKR_PIN_LEN_RANGE = 0xA2
_F_INITIALIZE, _F_FINALIZE, _F_GET_TOKEN_INFO, _F_INIT_TOKEN = 0, 1, 6, 9


class _FunctionList(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte),
                ("functions", ctypes.c_void_p * 11)]


class _TokenInfo(ctypes.Structure):
    _fields_ = [("label", ctypes.c_char * 32), ("manufacturer", ctypes.c_char * 32),
                ("model", ctypes.c_char * 16), ("serial", ctypes.c_char * 16),
                ("flags", ctypes.c_ulong), ("max_sessions", ctypes.c_ulong),
                ("sessions", ctypes.c_ulong), ("max_rw_sessions", ctypes.c_ulong),
                ("rw_sessions", ctypes.c_ulong), ("max_pin", ctypes.c_ulong), ("min_pin", ctypes.c_ulong),
                ("public_total", ctypes.c_ulong), ("public_free", ctypes.c_ulong),
                ("private_total", ctypes.c_ulong), ("private_free", ctypes.c_ulong),
                ("versions", ctypes.c_ubyte * 4), ("utc_time", ctypes.c_char * 16)]


class _InitArgs(ctypes.Structure):
    _fields_ = [("create_mutex", ctypes.c_void_p), ("destroy_mutex", ctypes.c_void_p),
                ("lock_mutex", ctypes.c_void_p), ("unlock_mutex", ctypes.c_void_p),
                ("flags", ctypes.c_ulong), ("reserved", ctypes.c_void_p)]


class Cryptoki:
    """Direct calls into a module's CK_FUNCTION_LIST for what python-pkcs11 does not offer."""

    def __init__(self, path: str) -> None:
        self.path = path
        cdll = ctypes.CDLL(path)  # same file => the same loaded instance python-pkcs11 uses
        get_list = cdll.C_GetFunctionList
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        get_list.restype = ctypes.c_ulong
        flist = ctypes.POINTER(_FunctionList)()
        if get_list(ctypes.byref(flist)) != _CKR_OK:
            raise HsmConfigError(f"{path}: C_GetFunctionList failed")
        self._cdll = cdll
        self._functions = flist.contents.functions

    def _fn(self, index: int, *argtypes: type[ctypes.c_ulong | ctypes.c_void_p | ctypes.c_char_p]
            ) -> Callable[..., int]:
        function: Callable[..., int] = ctypes.CFUNCTYPE(ctypes.c_ulong, *argtypes)(self._functions[index])
        return function

    def initialize(self) -> None:
        args = _InitArgs(None, None, None, None, _CKF_OS_LOCKING_OK, None)
        rv = self._fn(_F_INITIALIZE, ctypes.c_void_p)(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
        if rv not in (_CKR_OK, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise HsmConfigError(
                f"PKCS#11 module {self.path} failed to initialise (CKR 0x{rv:X}); for SoftHSM2 "
                "check SOFTHSM2_CONF and that its token directory exists and is writable"
            )

    def finalize(self) -> None:
        self._fn(_F_FINALIZE, ctypes.c_void_p)(None)

    def max_sessions(self, slot_id: int) -> int | None:
        """ulMaxSessionCount of the token in `slot_id` (python-pkcs11 does not keep it); None
        when C_GetTokenInfo fails."""
        info = _TokenInfo()
        fn = self._fn(_F_GET_TOKEN_INFO, ctypes.c_ulong, ctypes.c_void_p)
        if fn(slot_id, ctypes.cast(ctypes.pointer(info), ctypes.c_void_p)) != _CKR_OK:
            return None
        return int(info.max_sessions)

    def init_token(self, slot_id: int, so_pin: Secret, label: str) -> int:
        fn = self._fn(_F_INIT_TOKEN, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
        so = so_pin.reveal()
        return int(fn(slot_id, so, len(so), label.encode("utf-8").ljust(32, b" ")))


class _LockingLib(_pkcs11.lib):
    """python-pkcs11's library object, initialised with CKF_OS_LOCKING_OK by `Cryptoki`."""

    cryptoki: Cryptoki

    def initialize(self) -> None:
        type(self)._cryptoki_for(self.so).initialize()

    def finalize(self) -> None:
        type(self)._cryptoki_for(self.so).finalize()

    @staticmethod
    def _cryptoki_for(path: str) -> Cryptoki:
        if path not in _CRYPTOKI:
            _CRYPTOKI[path] = Cryptoki(path)
        return _CRYPTOKI[path]


_CRYPTOKI: dict[str, Cryptoki] = {}
_LIBS: dict[str, _LockingLib] = {}
_SHARED: set[str] = set()
# C_GetSlotList one thread at a time in the process: two pools on one module (two tokens) must
# not enumerate slots at once (SoftHSM2 rebuilds its slot list in C_GetSlotList without a lock;
# two threads doing so renumbered slots under each other: CKR_SLOT_ID_INVALID). Held for that
# call only, never while a token is asked anything (a hung token must not hold up the other).
_SLOT_LIST = threading.Lock()


def present_slots(lib: _pkcs11.lib) -> list[Slot]:
    with _SLOT_LIST:
        return list(lib.get_slots(token_present=True))


_CONNECTING: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def connecting(module_path: str, wait: float) -> Iterator[None]:
    """Around a pool's connect (find the token, ask it, log in): one pool of the process at a
    time per module. Two pools connecting at once (two tokens) made SoftHSM2 lose one token's
    sessions and, once, the token itself until a restart. A connect that waits `wait` seconds
    for another (a token hung in C_Login) goes ahead without the lock rather than be held up."""
    with _SLOT_LIST:
        lock = _CONNECTING.setdefault(module_path, threading.Lock())
    held = lock.acquire(timeout=wait)
    try:
        yield
    finally:
        if held:
            lock.release()


def mark_shared(module_path: str) -> None:
    """Another user of the module lives in this process (pkcs11-provider): never C_Finalize it."""
    _SHARED.add(module_path)


def is_shared(module_path: str) -> bool:
    return module_path in _SHARED


def capabilities(token: Token, module_path: str) -> Capabilities:
    """What `token` can do (see `capabilities`): its mechanisms and token flags."""
    try:
        max_sessions = _LockingLib._cryptoki_for(module_path).max_sessions(token.slot.slot_id)
        return read_capabilities(token, max_sessions)
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"reading the mechanisms of token '{token.label}'") from None


def probe_secret_import(session: Session, capabilities: Capabilities) -> Capabilities:
    """`capabilities` with whether the token stores a secret key given to it: a session object
    (never on the token) made and destroyed at once. A token refusing the template or the call
    does not; any other failure leaves it unknown. Asked only when something needs the answer
    (`Hsm.ask_secret_import`): not at every connection."""
    if not capabilities.has(Need.HMAC_SHA256):
        return capabilities
    template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.TOKEN: False, Attribute.PRIVATE: False, Attribute.SIGN: True,
                Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.VALUE: secrets.token_bytes(32)}
    try:
        session.create_object(template).destroy()
    except (p11e.TemplateIncomplete, p11e.TemplateInconsistent, p11e.AttributeValueInvalid,
            p11e.AttributeTypeInvalid, p11e.FunctionNotSupported, p11e.GeneralError, p11e.FunctionFailed,
            p11e.AttributeReadOnly):
        return dataclasses.replace(capabilities, secret_import=False)
    except p11e.PKCS11Error:
        return capabilities
    return dataclasses.replace(capabilities, secret_import=True)


def init_token(lib: _pkcs11.lib, module_path: str, label: str, so_pin: Secret, user_pin: Secret | None) -> TokenSummary:
    """Initialise a free token slot with `label`, then (unless None) set the user PIN.
    Refuses a taken label."""
    if not label or len(label.encode("utf-8")) > 32:
        raise HsmConfigError("a token label must be 1 to 32 bytes of UTF-8")
    existing = [t for t in list_tokens(lib) if t.initialized and t.label == label]
    if existing:
        raise DuplicateObject(
            f"token '{label}' already exists (serial {existing[0].serial}); "
            "use it, or choose another label"
        )
    free = [s for s in present_slots(lib)
            if not (s.get_token().flags & TokenFlag.TOKEN_INITIALIZED)]
    if not free:
        raise HsmConfigError("no uninitialised token is available in this PKCS#11 module")
    rv = _LockingLib._cryptoki_for(module_path).init_token(free[0].slot_id, so_pin, label)
    if rv == _CKR_PIN_LEN_RANGE:
        raise HsmConfigError("the SO PIN length is out of the range this token accepts")
    if rv == _CKR_PIN_INCORRECT:
        raise LoginFailed("the token refused the SO PIN")
    if rv != _CKR_OK:
        raise HsmConfigError(f"C_InitToken failed with CKR 0x{rv:X}")

    token = find_token(lib, TokenSelector(label=label))
    return summarise(token) if user_pin is None else init_user_pin(lib, label, so_pin, user_pin)


def init_user_pin(lib: _pkcs11.lib, label: str, so_pin: Secret, user_pin: Secret) -> TokenSummary:
    """C_InitPIN as the security officer: the second step of making a token."""
    token = find_token(lib, TokenSelector(label=label))
    try:
        with token.open(rw=True, so_pin=so_pin.reveal_str()) as session:
            session.init_pin(user_pin.reveal_str())
    except p11e.PinLenRange:
        raise HsmConfigError("the user PIN length is out of the range this token accepts") from None
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"setting the user PIN of token '{label}'") from None
    return summarise(token)


def set_user_pin(token: Token, old: Secret, new: Secret) -> None:
    """C_SetPIN in a public read-write session: the user PIN from `old` to `new`."""
    try:
        with token.open(rw=True, attribute_mapper=attribute_mapper()) as session:
            session.set_pin(old.reveal_str(), new.reveal_str())
    except (p11e.PinLenRange, p11e.PinInvalid):
        raise HsmConfigError("the token does not accept the new PIN (its length or characters); "
                             "choose another") from None
    except (p11e.PinIncorrect, p11e.PinLocked, p11e.PinExpired, p11e.UserPinNotInitialized) as exc:
        err = translate(exc, "changing the PIN")
        raise LoginFailed(f"token '{token.label}': {err}",
                          pin_incorrect=isinstance(exc, p11e.PinIncorrect)) from None
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"changing the PIN of token '{token.label}'") from None


def reset_user_pin(token: Token, so_pin: Secret, new: Secret) -> None:
    """C_InitPIN as the security officer: a new user PIN, and the user PIN's tries restored."""
    try:
        session = token.open(rw=True, so_pin=so_pin.reveal_str())
    except p11e.PinIncorrect:
        raise LoginFailed(f"token '{token.label}': the token refused the SO PIN (that too spends "
                          "one of the SO PIN's tries); check the SO PIN file") from None
    except p11e.PinLocked:
        raise LoginFailed(f"token '{token.label}': the SO PIN is locked; only the token's "
                          "vendor tools (or re-initialising it, which erases its keys) can help") from None
    except p11e.AnotherUserAlreadyLoggedIn:
        raise HsmUnavailable(f"token '{token.label}' is logged in as the user in this process; "
                             "run this command on its own") from None
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"logging in to token '{token.label}' as the security officer") from None
    try:
        with session:
            session.init_pin(new.reveal_str())
    except (p11e.PinLenRange, p11e.PinInvalid):
        raise HsmConfigError("the token does not accept the new PIN (its length or characters); "
                             "choose another") from None
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"setting the user PIN of token '{token.label}'") from None
