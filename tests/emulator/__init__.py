"""A local Azure IoT Hub + DPS emulator speaking MQTT 3.1.1 over TLS, for tests.

It checks credentials the way Azure does (SAS HMAC, expiry and exact resource URI; X.509
chain to the CA enrolled for *this* identity and CN == device/registration id) and answers
with CONNACK 5 where Azure would, so the SDK raises ``CredentialError``.

    from emulator import Emulator, pki
    with Emulator(host, server_cert=..., server_key=...) as emu:
        emu.add_device("dev1", symmetric_key=key)
        ...                      # connect with azure-iot-device
        emu.received.telemetry   # what arrived

See ``core.Emulator`` for the whole API and ``fixtures`` for pytest fixtures.
"""

from . import pki
from .auth import derive_group_key, make_sas_token, new_symmetric_key
from .core import Emulator
from .dps import ECHO
from .records import (
    AssignmentRecord,
    ConnectRecord,
    DisconnectRecord,
    Received,
    RegistrationRecord,
    ReportedPatchRecord,
    SubscriptionRecord,
    TelemetryRecord,
)

__all__ = [
    "ECHO",
    "AssignmentRecord",
    "ConnectRecord",
    "DisconnectRecord",
    "Emulator",
    "Received",
    "RegistrationRecord",
    "ReportedPatchRecord",
    "SubscriptionRecord",
    "TelemetryRecord",
    "derive_group_key",
    "make_sas_token",
    "new_symmetric_key",
    "pki",
]
