"""Loading a PKCS#11 module, finding the token (by label or serial, never slot id), logging in.

Login is per token, not per session: one long-lived logged-in session is kept and
CKR_USER_ALREADY_LOGGED_IN counts as success. Worker sessions are opened without a PIN and
share that login; closing them does not log the token out.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import TokenFlag

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


def load_module(path: str) -> Any:
    """Load (or return the already loaded) PKCS#11 module at `path`."""
    if not Path(path).is_file():
        raise HsmConfigError(
            f"PKCS#11 module {path} does not exist; install the vendor library or set "
            "SPYRUS_HSM_PKCS11_MODULE (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)"
        )
    if not os.access(path, os.R_OK):
        raise HsmConfigError(f"PKCS#11 module {path} is not readable by uid {os.getuid()}")
    try:
        lib = pkcs11.lib(path)
        if not lib.initialized:
            lib.initialize()
        return lib
    except p11e.PKCS11Error as exc:
        raise HsmConfigError(
            f"PKCS#11 module {path} failed to initialise ({exc or type(exc).__name__}); "
            "for SoftHSM2 check SOFTHSM2_CONF and that its token directory exists and is writable"
        ) from None
    except OSError as exc:
        raise HsmConfigError(f"PKCS#11 module {path} cannot be loaded: {exc}") from None


def summarise(token: Any) -> TokenSummary:
    return TokenSummary(
        label=token.label,
        serial=_serial_text(token.serial),
        manufacturer=token.manufacturer_id,
        model=token.model,
        initialized=bool(token.flags & TokenFlag.TOKEN_INITIALIZED),
    )


def list_tokens(lib: Any) -> list[TokenSummary]:
    out = []
    for slot in lib.get_slots(token_present=True):
        try:
            out.append(summarise(slot.get_token()))
        except p11e.PKCS11Error:
            continue  # a slot whose token vanished between the two calls
    return out


def find_token(lib: Any, selector: TokenSelector) -> Any:
    """The one initialised token matching `selector`; a clear error listing what is there."""
    matches = []
    try:
        slots = lib.get_slots(token_present=True)
    except p11e.PKCS11Error as exc:
        raise translate(exc, "listing HSM slots") from None
    for slot in slots:
        try:
            token = slot.get_token()
        except (p11e.TokenNotPresent, p11e.DeviceRemoved, p11e.TokenNotRecognised):
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


def login(token: Any, pin: Secret) -> Any:
    """A read-write session logged in as the user; ALREADY_LOGGED_IN counts as success."""
    try:
        return token.open(rw=True, user_pin=pin.reveal_str())
    except p11e.UserAlreadyLoggedIn:
        # python-pkcs11 opened a session before C_Login failed; the login state is the
        # token's, so a plain session here is already in the user state.
        return open_session(token)
    except (p11e.PinIncorrect, p11e.PinLocked, p11e.PinExpired, p11e.PinLenRange,
            p11e.UserPinNotInitialized) as exc:
        err = translate(exc, "logging in")
        raise LoginFailed(f"token '{token.label}': {err}") from None
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"logging in to token '{token.label}'") from None


def open_session(token: Any) -> Any:
    try:
        return token.open(rw=True)
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"opening a session on token '{token.label}'") from None


def finalize_quietly(lib: Any) -> None:
    """C_Finalize, ignoring errors: only when no other thread is inside a PKCS#11 call."""
    try:
        lib.finalize()
    except p11e.PKCS11Error:
        pass


def initialize(lib: Any) -> None:
    try:
        if not lib.initialized:
            lib.initialize()
    except p11e.PKCS11Error as exc:
        raise HsmUnavailable(f"the PKCS#11 module failed to reinitialise ({exc})") from None


def _serial_text(serial: bytes) -> str:
    return serial.decode("ascii", "replace").strip().strip("\x00")


# --- C_InitToken ----------------------------------------------------------------------------
# python-pkcs11 has no C_InitToken; it is reached through the module's own function list.

class _FunctionList(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte),
                ("functions", ctypes.c_void_p * 11)]


_C_INIT_TOKEN = 9  # index in CK_FUNCTION_LIST after the version
_CKR_OK = 0
_CKR_PIN_INCORRECT = 0xA0
_CKR_PIN_LEN_RANGE = 0xA2


def init_token(lib: Any, module_path: str, label: str, so_pin: Secret, user_pin: Secret) -> TokenSummary:
    """Initialise a free token slot with `label`, then set the user PIN. Refuses a taken label."""
    if not label or len(label.encode("utf-8")) > 32:
        raise HsmConfigError("a token label must be 1 to 32 bytes of UTF-8")
    existing = [t for t in list_tokens(lib) if t.initialized and t.label == label]
    if existing:
        raise DuplicateObject(
            f"token '{label}' already exists (serial {existing[0].serial}); "
            "use it, or choose another label"
        )
    free = [s for s in lib.get_slots(token_present=True)
            if not (s.get_token().flags & TokenFlag.TOKEN_INITIALIZED)]
    if not free:
        raise HsmConfigError("no uninitialised token is available in this PKCS#11 module")
    slot_id = free[0].slot_id

    cdll = ctypes.CDLL(module_path)
    get_list = cdll.C_GetFunctionList
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
    get_list.restype = ctypes.c_ulong
    flist = ctypes.POINTER(_FunctionList)()
    if get_list(ctypes.byref(flist)) != _CKR_OK:
        raise HsmConfigError(f"{module_path}: C_GetFunctionList failed")
    proto = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong,
                             ctypes.c_char_p)
    c_init_token = proto(flist.contents.functions[_C_INIT_TOKEN])
    padded = label.encode("utf-8").ljust(32, b" ")
    so = so_pin.reveal()
    rv = c_init_token(slot_id, so, len(so), padded)
    if rv == _CKR_PIN_LEN_RANGE:
        raise HsmConfigError("the SO PIN length is out of the range this token accepts")
    if rv == _CKR_PIN_INCORRECT:
        raise LoginFailed("the token refused the SO PIN")
    if rv != _CKR_OK:
        raise HsmConfigError(f"C_InitToken failed with CKR 0x{rv:X}")

    token = find_token(lib, TokenSelector(label=label))
    try:
        with token.open(rw=True, so_pin=so_pin.reveal_str()) as session:
            session.init_pin(user_pin.reveal_str())
    except p11e.PinLenRange:
        raise HsmConfigError("the user PIN length is out of the range this token accepts") from None
    except p11e.PKCS11Error as exc:
        raise translate(exc, f"setting the user PIN of token '{label}'") from None
    return summarise(token)
