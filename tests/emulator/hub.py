"""IoT Hub over MQTT: device/module identities, telemetry, twins, direct methods, C2D.

Topics and status codes follow azure-iot-device 2.14 and Microsoft's "Communicate with an IoT
hub using MQTT" page.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from . import mqtt
from .auth import AuthError, Credential, check_sas, check_x509, parse_sas_token
from .records import Received, ReportedPatchRecord, TelemetryRecord
from .server import Authenticated, Service, Session, Unanswered, parse_query, split_topic

log = logging.getLogger(__name__)

TWIN_RESPONSE = "$iothub/twin/res/#"
TWIN_DESIRED = "$iothub/twin/PATCH/properties/desired/#"
METHODS = "$iothub/methods/POST/#"
DEVICE_NOT_ONLINE = {"errorCode": 404103, "message": "Timed out waiting for device to connect."}
METHOD_TIMEOUT = {"errorCode": 504101, "message": "Timed out waiting for the response from device."}


@dataclass
class Twin:
    desired: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    desired_version: int = 1
    reported_version: int = 1

    def document(self) -> dict[str, Any]:
        """The body of a twin GET response."""
        return {
            "desired": {**copy.deepcopy(self.desired), "$version": self.desired_version},
            "reported": {**copy.deepcopy(self.reported), "$version": self.reported_version},
        }


@dataclass
class HubIdentity:
    device_id: str
    module_id: str | None
    credential: Credential
    twin: Twin = field(default_factory=Twin)

    @property
    def client_id(self) -> str:
        return f"{self.device_id}/{self.module_id}" if self.module_id else self.device_id

    def resource_uri(self, hub: str) -> str:
        uri = f"{hub}/devices/{self.device_id}"
        return f"{uri}/modules/{self.module_id}" if self.module_id else uri

    @property
    def topic_base(self) -> str:
        base = f"devices/{self.device_id}"
        return f"{base}/modules/{self.module_id}" if self.module_id else base


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch as twins apply it: nested objects merge, null deletes."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class IotHub(Service):
    """The IoT Hub side of the emulator. All methods run on the emulator's event loop."""

    name = "hub"

    def __init__(self, hostname: str, received: Received) -> None:
        self.hostname = hostname
        self.received = received
        self.identities: dict[str, HubIdentity] = {}
        self.sessions: dict[str, Session] = {}
        self._pending: dict[str, tuple[Session, asyncio.Future[tuple[int, Any]]]] = {}
        self._request_ids = itertools.count(1)
        self.refusals = 0        # the next connects refused with CONNACK 5, whatever their credential
        # ... the next ones presenting a certificate other than those accepted before for their client id
        self.new_certificate_refusals = 0
        self._accepted_certificates: dict[str, set[bytes]] = {}  # client id -> SHA-256 of each accepted
        self.stalled = False     # publishes get no PUBACK and no twin response, as a hung hub

    # --- registry ---------------------------------------------------------------------------

    def add_identity(self, device_id: str, module_id: str | None, credential: Credential) -> None:
        if module_id and device_id not in self.identities:
            raise ValueError(f"module {module_id!r}: device {device_id!r} is not registered")
        identity = HubIdentity(device_id, module_id, credential)
        previous = self.identities.get(identity.client_id)
        if previous is not None:
            identity.twin = previous.twin  # re-registration keeps the twin, as DPS does
        self.identities[identity.client_id] = identity

    def identity(self, device_id: str, module_id: str | None = None) -> HubIdentity:
        client_id = f"{device_id}/{module_id}" if module_id else device_id
        try:
            return self.identities[client_id]
        except KeyError:
            raise KeyError(f"{client_id!r} is not registered in the hub") from None

    # --- Service ----------------------------------------------------------------------------

    def claims(self, username: str) -> bool:
        return username.startswith(self.hostname + "/")

    def authenticate(self, connect: mqtt.Connect, chain: list[x509.Certificate]) -> Authenticated:
        """Username ``{hub}/{clientId}/?api-version=...``; SAS for ``{hub}/devices/{d}[...]``."""
        named = (connect.username or "")[len(self.hostname) + 1 :].partition("/?")[0].rstrip("/")
        if named != connect.client_id:
            raise AuthError(f"username names {named!r} but the client id is {connect.client_id!r}")
        identity = self.identities.get(connect.client_id)
        if self.refusals > 0:
            self.refusals -= 1
            raise AuthError(f"{connect.client_id!r} refused on the test's request")
        presented = chain[0].fingerprint(hashes.SHA256()) if chain else None
        accepted = self._accepted_certificates.setdefault(connect.client_id, set())
        if self.new_certificate_refusals > 0 and accepted and presented is not None and presented not in accepted:
            self.new_certificate_refusals -= 1
            raise AuthError(f"{connect.client_id!r} refused on the test's request (a new certificate)")
        if identity is None:
            raise AuthError(f"{connect.client_id!r} is not registered in the hub")
        credential = identity.credential
        if credential.ca is not None:
            check_x509(chain, credential.ca, identity.device_id)
            assert presented is not None  # check_x509 accepts no empty chain
            accepted.add(presented)
            return Authenticated("x509", identity)
        token = parse_sas_token(connect.password)
        check_sas(token, identity.resource_uri(self.hostname), credential.keys)
        return Authenticated("sas", identity, expires_at=token.expiry)

    def grant(self, session: Session, topic_filter: str, qos: int) -> int:
        identity: HubIdentity = session.identity
        own = (
            f"{identity.topic_base}/inputs/#"
            if identity.module_id
            else f"{identity.topic_base}/messages/devicebound/#"
        )
        allowed = {TWIN_RESPONSE, TWIN_DESIRED, METHODS, own}
        return min(qos, 1) if topic_filter in allowed else mqtt.SUBACK_FAILURE

    def handle_publish(self, session: Session, packet: mqtt.Publish) -> None:
        if self.stalled:
            raise Unanswered(f"hub stalled: {session.client_id} gets no answer to {packet.topic}")
        identity: HubIdentity = session.identity
        path, query = split_topic(packet.topic)
        events = f"{identity.topic_base}/messages/events/"
        if packet.topic.startswith(events) or packet.topic == events.rstrip("/"):
            self._telemetry(identity, packet.topic, packet.payload)
        elif path == "$iothub/twin/GET/":
            self._respond_twin(session, query, 200, json.dumps(identity.twin.document()))
        elif path == "$iothub/twin/PATCH/properties/reported/":
            self._reported_patch(session, identity, query, packet.payload)
        elif path.startswith("$iothub/methods/res/"):
            self._method_response(session, path, query, packet.payload)
        else:
            raise mqtt.ProtocolError(f"{session.client_id} may not publish to {packet.topic!r}")

    def closed(self, session: Session) -> None:
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        for owner, future in self._pending.values():
            if owner is session and not future.done():
                future.set_result((404, DEVICE_NOT_ONLINE))

    def opened(self, session: Session) -> None:
        self.sessions[session.client_id] = session

    # --- device-to-cloud ----------------------------------------------------------------------

    def _telemetry(self, identity: HubIdentity, topic: str, payload: bytes) -> None:
        properties = parse_query(topic.split("/messages/events", 1)[1].lstrip("/"))
        self.received.telemetry.append(
            TelemetryRecord(identity.device_id, identity.module_id, topic, properties, payload)
        )
        log.info("telemetry from %s (%d bytes)", identity.client_id, len(payload))

    def _respond_twin(
        self, session: Session, query: dict[str, str | None], status: int, body: str = "",
        extra: str = "",
    ) -> None:  # fmt: skip
        rid = query.get("$rid")
        if not rid:
            raise mqtt.ProtocolError("twin request without $rid")
        session.publish(f"$iothub/twin/res/{status}/?$rid={quote(rid, safe='')}{extra}", body)

    def _reported_patch(
        self, session: Session, identity: HubIdentity, query: dict[str, str | None], body: bytes
    ) -> None:
        try:
            patch = json.loads(body)
        except ValueError:
            patch = None
        if not isinstance(patch, dict):
            error = {"errorCode": 400004, "message": "reported patch must be a JSON object"}
            self._respond_twin(session, query, 400, json.dumps(error))
            return
        twin = identity.twin
        merge_patch(twin.reported, patch)
        twin.reported_version += 1
        self.received.reported_patches.append(
            ReportedPatchRecord(identity.device_id, identity.module_id, patch, twin.reported_version)
        )
        self._respond_twin(session, query, 204, extra=f"&$version={twin.reported_version}")

    def _method_response(
        self, session: Session, path: str, query: dict[str, str | None], body: bytes
    ) -> None:
        status_text = path.removeprefix("$iothub/methods/res/").rstrip("/")
        pending = self._pending.get(query.get("$rid") or "")
        if not status_text.isdigit():
            raise mqtt.ProtocolError(f"method response status {status_text!r} is not a number")
        if pending is None or pending[0] is not session or pending[1].done():
            log.info("late or unknown method response from %s ignored", session.client_id)
            return
        try:
            payload = json.loads(body) if body.strip() else None
        except ValueError:
            payload = body.decode("utf-8", "replace")
        pending[1].set_result((int(status_text), payload))

    # --- cloud-to-device (called through the Emulator) ----------------------------------------

    def send_desired_patch(
        self, device_id: str, patch: dict[str, Any], module_id: str | None = None
    ) -> int:
        """Apply a desired-properties patch and push it to the connected client."""
        identity = self.identity(device_id, module_id)
        twin = identity.twin
        merge_patch(twin.desired, patch)
        twin.desired_version += 1
        session = self.sessions.get(identity.client_id)
        if session is not None:
            body = json.dumps({**patch, "$version": twin.desired_version})
            topic = f"$iothub/twin/PATCH/properties/desired/?$version={twin.desired_version}"
            session.publish(topic, body)
        return twin.desired_version

    async def invoke_method(
        self,
        device_id: str,
        method_name: str,
        payload: Any,
        timeout: float,
        module_id: str | None = None,
    ) -> tuple[int, Any]:
        """A direct method round trip; (404, ...) if not connected/subscribed, (504, ...) on
        timeout, like the service API."""
        identity = self.identity(device_id, module_id)
        session = self.sessions.get(identity.client_id)
        topic_probe = f"$iothub/methods/POST/{method_name}/?$rid=0"
        if session is None or session.granted_qos(topic_probe) is None:
            return 404, DEVICE_NOT_ONLINE
        rid = format(next(self._request_ids), "x")
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (session, future)
        try:
            session.publish(f"$iothub/methods/POST/{method_name}/?$rid={rid}", json.dumps(payload))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return 504, METHOD_TIMEOUT
        finally:
            del self._pending[rid]

    def send_message(
        self,
        device_id: str,
        payload: bytes | str,
        module_id: str | None = None,
        input_name: str | None = None,
        properties: dict[str, str] | None = None,
    ) -> bool:
        """C2D message to a device, or an input message to a module; False if not delivered
        (the emulator does not queue for offline devices)."""
        identity = self.identity(device_id, module_id)
        props = dict(properties or {})
        if module_id:
            if not input_name:
                raise ValueError("a module message needs input_name")
            topic = f"{identity.topic_base}/inputs/{input_name}/"
        else:
            topic = f"{identity.topic_base}/messages/devicebound/"
            props.setdefault("$.to", f"/devices/{device_id}/messages/deviceBound")
        props.setdefault("$.mid", f"{time.time_ns():x}")
        topic += "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in props.items())
        session = self.sessions.get(identity.client_id)
        return session is not None and session.publish(topic, payload)
