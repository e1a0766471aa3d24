"""Connecting to the token, reconnecting after a fault, and the memory of a refused PIN.

A connection finds the token by label/serial (never slot id), logs in and records which token
(label, serial) it logged in to: probes compare against it, and a reconnection that finds
another token with the same label (a swapped spare) says so. Each reconnection starts from a
fresh C_Initialize, so re-enumerated devices are seen and a module that caches a token's
contents (SoftHSM2) reads them again — unless pkcs11-provider shares the module in this
process: finalising under it leaves it unable to use any key until restart, so then only the
sessions and the login are renewed, and a token whose contents changed cannot be re-read
in this process (`reinitialisable` is False): the module has to restart.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path

from pkcs11 import _pkcs11
from pkcs11.types import Session, Token

from . import library
from .capabilities import Capabilities
from .errors import LoginFailed
from .library import TokenSelector, TokenSummary
from .refusals import RefusedPins
from .secret import Secret

PinSource = Secret | Callable[[], Secret]
# The exit code asking the runtime for a clean restart (EX_TEMPFAIL): the token changed in a way
# only a fresh process can re-read. See `restart_once`.
EXIT_RESTART = 75
_RESTART_MARKER = "hsm-restart"


class Connection:
    """The loaded module, the token logged in to, and the login session.

    Not thread-safe: the pool calls it from one thread at a time, with no PKCS#11 call in
    flight when it reconnects (C_Finalize is unsafe otherwise)."""

    def __init__(self, module_path: str, selector: TokenSelector, pin: PinSource,
                 refused_pins: RefusedPins | None = None) -> None:
        """`pin` is the PIN, or a function returning it (re-read at every attempt, so a fixed
        PIN file is picked up without a restart); `refused_pins`, where a refused PIN is
        remembered beyond this process (see `refusals`)."""
        self._module_path = module_path
        self._selector = selector
        self._pin_source = pin
        self._refused_pins = refused_pins
        self._refused_pin: bytes | None = None
        self._lib: _pkcs11.lib | None = None
        self._token: Token | None = None
        self._login_session: Session | None = None
        self.identity: TokenSummary | None = None  # the token logged in to, last time it worked
        self.capabilities: Capabilities | None = None  # what it can do, asked at that connection

    @property
    def reinitialisable(self) -> bool:
        """Whether C_Finalize + C_Initialize is allowed (no pkcs11-provider on the module)."""
        return not library.is_shared(self._module_path)

    def open_session(self) -> Session:
        assert self._token is not None, "not connected"
        return library.open_session(self._token)

    def connect(self, wait_for_others: float = 10.0) -> TokenSummary:
        """Find the token, ask what it can do and log in (unless it needs no login); returns the
        token now logged in to. Pools of the process connect one at a time (two tokens: see
        `library.connecting`), waiting at most `wait_for_others` for another's connect."""
        with library.connecting(self._module_path, wait_for_others):
            return self._connect()

    def _connect(self) -> TokenSummary:
        if self._lib is None:
            self._lib = library.load_module(self._module_path)
        token = library.find_token(self._lib, self._selector)
        capabilities = library.capabilities(token, self._module_path)
        if not capabilities.login_required:
            # No CKF_LOGIN_REQUIRED: the token is used without C_Login (and without the PIN).
            self._login_session = library.open_session(token)
            return self._connected(token, capabilities)
        pin = self._pin_source() if callable(self._pin_source) else self._pin_source
        digest = hashlib.sha256(pin.reveal()).digest()
        if self._refused_pin is not None and hmac.compare_digest(digest, self._refused_pin):
            # Retrying a refused PIN would count towards locking the token: wait for a new one.
            raise LoginFailed(f"token '{token.label}': the token refused the PIN; fix the PIN file "
                              "(not retried until its content changes, so the PIN is not locked)")
        serial = library.summarise(token).serial
        if self._refused_pins is not None:
            # ... nor one that another process (an earlier run, a CLI command) saw refused.
            refusal = self._refused_pins.refusal(serial, pin)
            if refusal is not None:
                raise LoginFailed(f"token '{token.label}' (serial {serial}) {refusal}")
        try:
            self._login_session = library.login(token, pin)
        except LoginFailed as exc:
            if exc.pin_refused:  # not when the token has no user PIN yet: it is being set up
                self._refused_pin = digest
            if exc.pin_incorrect and self._refused_pins is not None:
                self._refused_pins.refused(serial, pin)
            raise
        self._refused_pin = None
        if self._refused_pins is not None:
            self._refused_pins.clear(serial)
        return self._connected(token, capabilities)

    def _connected(self, token: Token, capabilities: Capabilities) -> TokenSummary:
        self._token = token
        self.capabilities = capabilities
        self.identity = library.summarise(token)
        return self.identity

    def reconnect(self) -> TokenSummary:
        """Drop the login and sessions and connect again, from a fresh C_Initialize when allowed."""
        if self._lib is not None:
            self.drop()
            if self.reinitialisable:
                library.finalize_quietly(self._lib)
                library.initialize(self._lib)
        return self.connect()

    def drop(self) -> None:
        """Forget the login session without closing it: C_Logout would log out every session of
        the token in this process (pkcs11-provider's too). Process exit ends the login."""
        self._login_session = None
        self._token = None


def restart_once(state_dir: Path, change: str) -> bool:
    """Whether to exit with EXIT_RESTART for `change` (what changed, with the serial logged in
    to): True the first time, False if the previous process already exited for the very same
    change (a restart did not help; exiting again would only loop)."""
    marker = state_dir / _RESTART_MARKER
    try:
        if marker.read_text() == change:
            return False
    except OSError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(change)
    return True


def restart_done(state_dir: Path) -> None:
    """The HSM is ready again: a later change may restart the module once more."""
    (state_dir / _RESTART_MARKER).unlink(missing_ok=True)
