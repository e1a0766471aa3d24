"""What the emulator saw, for tests to assert on (``Emulator.received``).

Records are appended on the emulator's thread and read from the test's thread; the lists only
ever grow, and ``snapshot``-style reads (``list(...)``) are safe under the GIL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConnectRecord:
    """One connection attempt. ``outcome`` is "accepted" or the reason it was refused."""

    service: str  # "hub", "dps" or "" when the username named neither
    client_id: str
    username: str
    auth_method: str  # "sas", "x509", "none"
    outcome: str
    return_code: int | None  # CONNACK code sent, None if closed without one (TLS, protocol)
    peer: str = ""

    @property
    def accepted(self) -> bool:
        return self.outcome == "accepted"


@dataclass(frozen=True)
class DisconnectRecord:
    service: str
    client_id: str
    reason: str  # "client disconnected", "replaced by a new connection", a protocol error, ...


@dataclass(frozen=True)
class TelemetryRecord:
    device_id: str
    module_id: str | None
    topic: str
    properties: dict[str, str | None]
    payload: bytes

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass(frozen=True)
class RegistrationRecord:
    """One DPS register request (PUT) and the status it was answered with."""

    registration_id: str
    payload: Any
    status_code: int
    operation_id: str | None = None


@dataclass(frozen=True)
class AssignmentRecord:
    registration_id: str
    device_id: str
    assigned_hub: str
    enrollment: str  # "individual:<regId>" or "group:<name>"


@dataclass(frozen=True)
class ReportedPatchRecord:
    device_id: str
    module_id: str | None
    patch: dict[str, Any]
    version: int


@dataclass(frozen=True)
class SubscriptionRecord:
    service: str
    client_id: str
    topic_filter: str
    granted: int  # granted QoS, or 0x80 for a refused filter


@dataclass
class Received:
    """Everything recorded so far, one list per kind, oldest first."""

    connects: list[ConnectRecord] = field(default_factory=list)
    disconnects: list[DisconnectRecord] = field(default_factory=list)
    telemetry: list[TelemetryRecord] = field(default_factory=list)
    registrations: list[RegistrationRecord] = field(default_factory=list)
    assignments: list[AssignmentRecord] = field(default_factory=list)
    reported_patches: list[ReportedPatchRecord] = field(default_factory=list)
    subscriptions: list[SubscriptionRecord] = field(default_factory=list)

    def accepted_connects(self, client_id: str | None = None) -> list[ConnectRecord]:
        return [
            c for c in self.connects if c.accepted and client_id in (None, c.client_id)
        ]

    def refused_connects(self, client_id: str | None = None) -> list[ConnectRecord]:
        return [
            c for c in self.connects if not c.accepted and client_id in (None, c.client_id)
        ]
