"""Errors raised by the HSM layer: each message tells the operator what to do next.

Nothing here ever carries a PIN, key bytes or data being signed. PKCS#11 exceptions from
python-pkcs11 are translated to these in one place (`hsm.faults.translate`), so no caller
outside `hsm/` has to know the PKCS#11 return codes. Each class's `kind` decides the CLI's
exit code and the API's HTTP status (see `spyrus_hsm.errors`).
"""

from __future__ import annotations

from ..errors import Kind, SpyrusError


class HsmError(SpyrusError, kind=Kind.REFUSED):
    """Base of every error the HSM layer raises."""


class HsmConfigError(HsmError, kind=Kind.CONFIG):
    """The configuration points at something that is not there (module, token, PIN file)."""


class TokenNotFound(HsmConfigError):
    """No token with the configured label or serial is present."""


class PinFileError(HsmConfigError):
    """The PIN file is missing, unreadable, too open or empty."""


class LoginFailed(HsmError, kind=Kind.UNAVAILABLE):
    """The token refused the PIN (wrong, locked or expired), or has no user PIN yet.

    `pin_refused` is False when the token did not judge the PIN at all (no user PIN yet, as
    between C_InitToken and C_InitPIN): the same PIN may then be tried again. `pin_incorrect`
    is True when the token judged the PIN wrong (CKR_PIN_INCORRECT), spending one of its tries."""

    def __init__(self, message: str, *, pin_refused: bool = True, pin_incorrect: bool = False) -> None:
        super().__init__(message)
        self.pin_refused = pin_refused
        self.pin_incorrect = pin_incorrect


class ObjectNotFound(HsmError, kind=Kind.NOT_FOUND):
    """No object matches the label, id or URI asked for."""


class DuplicateObject(HsmError, kind=Kind.CONFLICT):
    """More than one object matches where exactly one was expected, or a label is taken."""


class InvalidInput(HsmError, kind=Kind.INVALID):
    """Key material, a certificate or a parameter given to the HSM layer is unusable."""


class OperationFailed(HsmError, kind=Kind.REFUSED):
    """The token rejected an operation for a reason other than availability."""


class HsmUnavailable(HsmError, kind=Kind.UNAVAILABLE):
    """The token is not usable right now (unplugged, recovering, not logged in)."""


class HsmTimeout(HsmUnavailable, kind=Kind.TIMEOUT):
    """An HSM call did not finish within its timeout."""


class HsmBusy(HsmUnavailable, kind=Kind.BUSY):
    """The bounded queue of HSM work is full; retry later.

    `drain_seconds`, when known, is how long the work already queued should take: a caller told
    to come back then finds room, rather than bouncing again every second."""

    def __init__(self, message: str, *, drain_seconds: float | None = None) -> None:
        super().__init__(message)
        self.drain_seconds = drain_seconds


class TokenChanged(HsmUnavailable):
    """The token's contents changed under the module: unreadable, another token with the same
    label, or an object found before is gone. The pool re-reads the token, as after a fault."""
