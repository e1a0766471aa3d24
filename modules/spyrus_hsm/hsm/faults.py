"""Translate python-pkcs11 exceptions into this layer's errors, in one place.

Also decides which failures mean "the token went away" (unplugged, reset, logged out) and so
start recovery, as opposed to a request the token refused.
"""

from __future__ import annotations

import pkcs11.exceptions as p11e

from . import errors

# Failures after which no session or handle can be trusted: recover (reinitialise, log in).
_DEVICE_FAULTS: tuple[type[BaseException], ...] = (
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.DeviceError,
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.UserNotLoggedIn,
    # The slot the token was found in is gone: the reader re-enumerated (a USB token replugged
    # into another port; SoftHSM2 renumbering a token another process re-initialised). The
    # token is looked for again by label and serial.
    p11e.SlotIDInvalid,
)

_REASONS: dict[type[BaseException], str] = {
    p11e.DeviceRemoved: "the HSM was removed (CKR_DEVICE_REMOVED)",
    p11e.TokenNotPresent: "the token is not present (CKR_TOKEN_NOT_PRESENT)",
    p11e.TokenNotRecognised: "the token is not recognised (CKR_TOKEN_NOT_RECOGNIZED)",
    p11e.DeviceError: "the HSM reported a device error (CKR_DEVICE_ERROR)",
    p11e.SessionHandleInvalid: "the HSM session was lost (CKR_SESSION_HANDLE_INVALID)",
    p11e.SessionClosed: "the HSM session was closed (CKR_SESSION_CLOSED)",
    p11e.UserNotLoggedIn: "the token is no longer logged in (CKR_USER_NOT_LOGGED_IN)",
    p11e.SlotIDInvalid: "the token's slot is gone (CKR_SLOT_ID_INVALID)",
}


def is_device_fault(exc: BaseException) -> bool:
    return isinstance(exc, _DEVICE_FAULTS)


def fault_reason(exc: BaseException) -> str:
    if isinstance(exc, errors.HsmError):
        return str(exc)  # already translated where it happened, with its context
    for cls, reason in _REASONS.items():
        if isinstance(exc, cls):
            return reason
    return f"the HSM failed: {type(exc).__name__}"


def _invalid(message: str) -> errors.InvalidInput:
    """About the request itself (`what` names only the object it asked for): a caller may be told."""
    return errors.InvalidInput(message, public=message)


def translate(exc: BaseException, what: str) -> errors.HsmError:
    """An HsmError for a PKCS#11 failure during `what` (e.g. "signing with key 'edge'")."""
    if isinstance(exc, errors.HsmError):
        return exc
    if is_device_fault(exc):
        return errors.HsmUnavailable(
            f"{what} failed: {fault_reason(exc)}; the module is reconnecting, retry shortly"
        )
    if isinstance(exc, p11e.PinIncorrect):
        return errors.LoginFailed("the token refused the PIN; check the PIN file")
    if isinstance(exc, p11e.PinLocked):
        return errors.LoginFailed("the user PIN is locked; reset it with the SO PIN")
    if isinstance(exc, p11e.PinExpired):
        return errors.LoginFailed("the user PIN has expired; set a new one with the SO PIN")
    if isinstance(exc, (p11e.UserPinNotInitialized,)):
        return errors.LoginFailed("the token has no user PIN yet; run 'spyrus-hsm token init'",
                                  pin_refused=False)
    if isinstance(exc, (p11e.KeyTypeInconsistent, p11e.MechanismInvalid)):
        return _invalid(f"{what} failed: the key cannot be used for this algorithm")
    if isinstance(exc, (p11e.DataLenRange, p11e.DataInvalid)):
        return _invalid(f"{what} failed: the data is not acceptable for this algorithm")
    if isinstance(exc, (p11e.TemplateIncomplete, p11e.TemplateInconsistent,
                        p11e.AttributeValueInvalid, p11e.AttributeTypeInvalid)):
        return _invalid(f"{what} failed: the token rejected the object's attributes")
    if isinstance(exc, p11e.SessionCount):
        return errors.OperationFailed(f"{what} failed: the token allows no more sessions; lower hsm.workers")
    if isinstance(exc, p11e.DeviceMemory):
        return errors.OperationFailed(f"{what} failed: the token is out of memory; delete unused objects")
    if isinstance(exc, p11e.TokenWriteProtected):
        return errors.OperationFailed(f"{what} failed: the token is write-protected")
    if isinstance(exc, p11e.FunctionNotSupported):
        return errors.OperationFailed(f"{what} failed: the PKCS#11 module does not support it")
    if isinstance(exc, p11e.PKCS11Error):
        # python-pkcs11 messages hold return codes and fixed text, never data or PINs.
        detail = str(exc) or type(exc).__name__
        return errors.OperationFailed(f"{what} failed: {detail}")
    return errors.OperationFailed(f"{what} failed: {type(exc).__name__}")
