"""What azure-iot-device raises, in the package's error kinds.

The SDK's connect, send and twin calls raise its own exceptions (`CredentialError` when the hub
refuses the credential, `ConnectionFailedError`, `ConnectionDroppedError`, `NoConnectionError`,
`OperationTimeout`, `OperationCancelled`, `ClientError`, `ServiceError`), and its synchronous
calls wait without a timeout, so callers bound them (`threads.Lane`), which raises TimeoutError.
`translate` turns any of these into one `HubError` whose message names the hub, the identity,
what was being done and why, in one line.
"""

from __future__ import annotations

from azure.iot.device import exceptions as sdk

from .errors import Kind, SpyrusError

MAX_REASON = 300


class HubError(SpyrusError, ConnectionError, kind=Kind.UPSTREAM):
    """IoT Hub did not do what was asked (unreachable, dropped the connection, failed)."""


class HubCredentialRefused(HubError, kind=Kind.CREDENTIAL):
    """IoT Hub refused the credential (CONNACK 5: unknown device, certificate not trusted)."""


class HubTimeout(HubError, kind=Kind.TIMEOUT):
    """IoT Hub did not answer within the deadline."""


def translate(exc: BaseException, hub: str, client_id: str, what: str) -> BaseException:
    """The package's error for `exc`, raised by the SDK while `what` (e.g. "connecting") with
    the identity `client_id` at `hub`. Errors of the package itself pass through unchanged."""
    if isinstance(exc, SpyrusError):
        return exc
    where = f"IoT Hub {hub} ({client_id})"
    reason = _reason(exc)
    if isinstance(exc, sdk.CredentialError):
        return HubCredentialRefused(f"{where} refused the credential while {what}: {reason}")
    if isinstance(exc, (sdk.OperationTimeout, TimeoutError)):
        return HubTimeout(f"{where} did not answer while {what}: {reason}")
    if isinstance(exc, (sdk.ConnectionDroppedError, sdk.NoConnectionError)):
        return HubError(f"{where} dropped the connection while {what}: {reason}")
    if isinstance(exc, sdk.ConnectionFailedError):
        return HubError(f"cannot connect to {where}: {reason}")
    if isinstance(exc, (sdk.ClientError, sdk.ServiceError, sdk.OperationCancelled, OSError, ValueError,
                        RuntimeError)):
        return HubError(f"{where} failed while {what}: {reason}")
    return exc  # a bug of ours (TypeError, AttributeError, …): keep its traceback


def _reason(exc: BaseException) -> str:
    """The first non-empty message along the exception's chain of causes, on one line."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = " ".join(str(current).split())
        if text:
            reason = f"{type(current).__name__}: {text}" if current is not exc else text
            return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"
        current = current.__cause__ or current.__context__
    return type(exc).__name__
