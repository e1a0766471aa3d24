"""Errors raised by the HSM layer: each message tells the operator what to do next.

Nothing here ever carries a PIN, key bytes or data being signed. PKCS#11 exceptions from
python-pkcs11 are translated to these in one place (`hsm.faults.translate`), so no caller
outside `hsm/` has to know the PKCS#11 return codes.
"""

from __future__ import annotations


class HsmError(Exception):
    """Base of every error the HSM layer raises."""


class HsmConfigError(HsmError):
    """The configuration points at something that is not there (module, token, PIN file)."""


class TokenNotFound(HsmConfigError):
    """No token with the configured label or serial is present."""


class PinFileError(HsmConfigError):
    """The PIN file is missing, unreadable, too open or empty."""


class LoginFailed(HsmError):
    """The token refused the PIN (wrong, locked or expired), or has no user PIN yet.

    `pin_refused` is False when the token did not judge the PIN at all (no user PIN yet, as
    between C_InitToken and C_InitPIN): the same PIN may then be tried again."""

    def __init__(self, message: str, *, pin_refused: bool = True) -> None:
        super().__init__(message)
        self.pin_refused = pin_refused


class ObjectNotFound(HsmError):
    """No object matches the label, id or URI asked for."""


class DuplicateObject(HsmError):
    """More than one object matches where exactly one was expected, or a label is taken."""


class InvalidInput(HsmError):
    """Key material, a certificate or a parameter given to the HSM layer is unusable."""


class OperationFailed(HsmError):
    """The token rejected an operation for a reason other than availability."""


class HsmUnavailable(HsmError):
    """The token is not usable right now (unplugged, recovering, not logged in)."""


class HsmTimeout(HsmUnavailable):
    """An HSM call did not finish within its timeout."""


class HsmBusy(HsmUnavailable):
    """The bounded queue of HSM work is full; retry later."""


class TokenChanged(HsmUnavailable):
    """The token's contents changed under the module: unreadable, another token with the same
    label, or an object found before is gone. The pool re-reads the token, as after a fault."""
