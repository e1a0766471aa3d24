"""Device Provisioning Service over MQTT: enrollments, register, operation polling, throttling.

Flow (azure-iot-device 2.14): CONNECT ``{idScope}/registrations/{regId}/api-version=...``,
subscribe ``$dps/registrations/res/#``, PUT register -> 202 assigning -> GET operation status
until 200 assigned. Assigned devices become identities of the emulator's hub with the same
key or CA, so a test can register and then connect.

Certificate issuance (Azure Device Registry certificate management): on
api-version ``2025-07-01-preview`` the register body may carry ``csr`` (base64 DER PKCS#10).
DPS checks it (signature, key strength, subject CN equal to the registration id; 400 with an
errorCode/message body otherwise), signs it with its P-384 issuing CA and returns the chain in
``registrationState.issuedCertificateChain``; the device then authenticates to the hub with that
certificate.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime as dt
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from . import mqtt
from .auth import AuthError, Credential, check_sas, check_x509, derive_group_key, parse_sas_token
from .hub import IotHub
from .pki import Issued, issue_from_csr
from .records import AssignmentRecord, Received, RegistrationRecord
from .server import Authenticated, Service, Session, split_topic

log = logging.getLogger(__name__)

RESPONSES = "$dps/registrations/res/#"
REGISTER = "$dps/registrations/PUT/iotdps-register/"
OPERATION_STATUS = "$dps/registrations/GET/iotdps-get-operationstatus/"
# Azure: up to 128 of [A-Za-z0-9-._:], the last one alphanumeric or '-'.
_REGISTRATION_ID = re.compile(r"[A-Za-z0-9\-._:]{0,127}[A-Za-z0-9\-]")
#: The api-versions on which a register request may carry a CSR.
CERTIFICATE_API_VERSIONS = ("2025-07-01-preview",)
_STRONG_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_MIN_RSA_BITS = 2048


class _Echo:
    def __repr__(self) -> str:
        return "ECHO"


#: Enrollment ``payload`` default: return the device's own registration payload.
ECHO: Any = _Echo()


@dataclass
class Enrollment:
    kind: str  # "individual" or "group"
    name: str  # registration id (individual) or group name
    credential: Credential
    assigned_hub: str | None = None
    device_id: str | None = None
    payload: Any = ECHO

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass
class Attestation:
    """Who authenticated on a DPS connection, and the hub credential it maps to."""

    registration_id: str
    enrollment: Enrollment
    device_credential: Credential
    api_version: str = ""


@dataclass
class Operation:
    operation_id: str
    attestation: Attestation
    payload: Any
    csr: x509.CertificateSigningRequest | None = field(default=None, repr=False)
    polls: int = 0
    result: dict[str, Any] | None = field(default=None, repr=False)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error(code: int, message: str) -> dict[str, Any]:
    return {"errorCode": code, "trackingId": str(uuid.uuid4()), "message": message,
            "timestampUtc": _utc_now()}  # fmt: skip


class CsrRefused(Exception):
    """A CSR DPS will not sign; the message is what the device is told."""


def check_csr(encoded: Any, registration_id: str) -> x509.CertificateSigningRequest:
    """The CSR of a register request, if DPS would sign it: base64 DER, self-signature valid,
    an EC P-256/384/521 or RSA >= 2048 key, subject CN equal to the registration id."""
    try:
        if not isinstance(encoded, str):
            raise ValueError("not a string")
        csr = x509.load_der_x509_csr(base64.b64decode(encoded, validate=True))
        signed = csr.is_signature_valid
    except (ValueError, binascii.Error, TypeError) as exc:
        raise CsrRefused(f"The csr is not a base64 DER PKCS#10 request ({exc}).") from None
    if not signed:
        raise CsrRefused("The csr signature does not verify.")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _STRONG_CURVES):
            raise CsrRefused(f"The csr key curve {key.curve.name} is not allowed.")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CsrRefused(f"The csr RSA key of {key.key_size} bits is too weak.")
    else:
        raise CsrRefused(f"The csr key type {type(key).__name__} is not allowed.")
    names = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != registration_id:
        raise CsrRefused("The csr subject CN must equal the registration id.")
    return csr


class Dps(Service):
    """The DPS side of the emulator. All methods run on the emulator's event loop."""

    name = "dps"

    def __init__(self, id_scope: str, hub: IotHub, received: Received) -> None:
        self.id_scope = id_scope
        self.hub = hub
        self.received = received
        self.individual: dict[str, Enrollment] = {}
        self.groups: dict[str, Enrollment] = {}
        self.operations: dict[str, Operation] = {}
        self.created: dict[str, str] = {}
        self.polls_before_assigned = 1
        self.poll_retry_after = 1
        self.throttled: collections.deque[tuple[int, int]] = collections.deque()  # (status, retry-after)
        self.stalled = False
        self.issuing_ca: Issued | None = None  # set by the Emulator: signs operational certs
        self.issued_validity = dt.timedelta(days=30)

    def add_enrollment(self, enrollment: Enrollment) -> None:
        table = self.individual if enrollment.kind == "individual" else self.groups
        table[enrollment.name] = enrollment

    # --- Service ----------------------------------------------------------------------------

    def claims(self, username: str) -> bool:
        return username.startswith(f"{self.id_scope}/registrations/")

    def authenticate(self, connect: mqtt.Connect, chain: list[x509.Certificate]) -> Authenticated:
        registration_id, _, rest = (connect.username or "").split("/", 2)[-1].partition("/")
        if not rest.startswith("api-version="):
            raise AuthError("DPS username must be {idScope}/registrations/{id}/api-version=...")
        if registration_id != connect.client_id:
            raise AuthError(
                f"username names {registration_id!r} but the client id is {connect.client_id!r}"
            )
        if not _REGISTRATION_ID.fullmatch(registration_id):
            raise AuthError(f"invalid registration id {registration_id!r}")
        api_version = parse_qs(rest).get("api-version", [""])[0]
        if connect.password is None and chain:
            attestation = self._attest_x509(registration_id, chain)
            attestation.api_version = api_version
            return Authenticated("x509", attestation)
        token = parse_sas_token(connect.password)
        attestation = self._attest_sas(registration_id, token)
        attestation.api_version = api_version
        return Authenticated("sas", attestation, expires_at=token.expiry)

    def _candidates(self, registration_id: str, method: str) -> list[Enrollment]:
        """An individual enrollment takes precedence over every group, as in Azure."""
        individual = self.individual.get(registration_id)
        if individual is not None:
            return [individual]
        return [g for g in self.groups.values() if g.credential.method == method]

    def _attest_sas(self, registration_id: str, token: Any) -> Attestation:
        uri = f"{self.id_scope}/registrations/{registration_id}"
        error = AuthError(f"no symmetric-key enrollment matches {registration_id!r}")
        for enrollment in self._candidates(registration_id, "sas"):
            keys = enrollment.credential.keys
            if enrollment.kind == "group":
                keys = tuple(derive_group_key(k, registration_id) for k in keys)
            for key in keys:
                try:
                    check_sas(token, uri, [key], allowed_key_names=(None, "registration"))
                except AuthError as e:
                    error = e
                    continue
                return Attestation(registration_id, enrollment, Credential(keys=(key,)))
        raise error

    def _attest_x509(self, registration_id: str, chain: list[x509.Certificate]) -> Attestation:
        error = AuthError(f"no X.509 enrollment matches {registration_id!r}")
        for enrollment in self._candidates(registration_id, "x509"):
            ca = enrollment.credential.ca
            if ca is None:
                continue
            try:
                check_x509(chain, ca, registration_id)
            except AuthError as e:
                error = e
                continue
            return Attestation(registration_id, enrollment, enrollment.credential)
        raise error

    def grant(self, session: Session, topic_filter: str, qos: int) -> int:
        return min(qos, 1) if topic_filter == RESPONSES else mqtt.SUBACK_FAILURE

    def handle_publish(self, session: Session, packet: mqtt.Publish) -> None:
        path, query = split_topic(packet.topic)
        rid = query.get("$rid")
        if path not in (REGISTER, OPERATION_STATUS) or not rid:
            raise mqtt.ProtocolError(f"{session.client_id} may not publish to {packet.topic!r}")
        if self.stalled:
            log.info("DPS stalled: %s gets no answer to %s", session.client_id, path)
        elif self.throttled:
            self._throttled(session, rid, path, packet.payload, *self.throttled.popleft())
        elif path == REGISTER:
            self._register(session, rid, packet.payload)
        else:
            self._poll(session, rid, query.get("operationId") or "")

    # --- requests -----------------------------------------------------------------------------

    def _respond(
        self, session: Session, rid: str, status: int, body: Any, retry_after: int | None = None
    ) -> None:
        topic = f"$dps/registrations/res/{status}/?$rid={quote(rid, safe='')}"
        if retry_after is not None:
            topic += f"&retry-after={retry_after}"
        session.publish(topic, json.dumps(body))

    def _throttled(self, session: Session, rid: str, path: str, body: bytes, status: int,
                   retry_after: int) -> None:
        if path == REGISTER:
            self._record(session, _payload_of(body), status)
        message = "Operations are being throttled for this tenant." if status == 429 else "Request refused."
        self._respond(session, rid, status, _error(status * 1000 + 1, message),
                      retry_after=retry_after)

    def _register(self, session: Session, rid: str, body: bytes) -> None:
        attestation: Attestation = session.identity
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            self._record(session, None, 400)
            self._respond(session, rid, 400, _error(400004, "Invalid request body."))
            return
        if request.get("registrationId") != attestation.registration_id:
            self._record(session, request.get("payload"), 401)
            message = "registrationId in the body does not match the authenticated one."
            self._respond(session, rid, 401, _error(401002, message))
            return
        csr = None
        if "csr" in request:
            try:
                csr = self._accept_csr(attestation, request["csr"])
            except CsrRefused as refused:
                self._record(session, request.get("payload"), 400)
                self._respond(session, rid, 400, _error(400004, str(refused)))
                return
        operation = Operation(_operation_id(), attestation, request.get("payload"), csr)
        self.operations[operation.operation_id] = operation
        if self.polls_before_assigned <= 0:
            self._record(session, operation.payload, 200, operation.operation_id)
            self._respond(session, rid, 200, self._assign(operation))
        else:
            self._record(session, operation.payload, 202, operation.operation_id)
            assigning = {"operationId": operation.operation_id, "status": "assigning"}
            self._respond(session, rid, 202, assigning, retry_after=self.poll_retry_after)

    def _accept_csr(self, attestation: Attestation, encoded: Any) -> x509.CertificateSigningRequest:
        if attestation.api_version not in CERTIFICATE_API_VERSIONS:
            raise CsrRefused(f"csr is not supported on api-version {attestation.api_version!r}; "
                             f"use {CERTIFICATE_API_VERSIONS[-1]}.")  # fmt: skip
        if self.issuing_ca is None:
            raise CsrRefused("The enrollment is not linked to a certificate policy.")
        return check_csr(encoded, attestation.registration_id)

    def _poll(self, session: Session, rid: str, operation_id: str) -> None:
        operation = self.operations.get(operation_id)
        if operation is None or operation.attestation.registration_id != session.client_id:
            message = f"Operation {operation_id!r} not found."
            self._respond(session, rid, 404, _error(404001, message))
            return
        operation.polls += 1
        if operation.result is None and operation.polls < self.polls_before_assigned:
            assigning = {"operationId": operation_id, "status": "assigning"}
            self._respond(session, rid, 202, assigning, retry_after=self.poll_retry_after)
            return
        self._respond(session, rid, 200, operation.result or self._assign(operation))

    def _assign(self, operation: Operation) -> dict[str, Any]:
        """Assign the device to its hub (registering it there if it is this emulator's hub)."""
        attestation = operation.attestation
        enrollment = attestation.enrollment
        registration_id = attestation.registration_id
        device_id = enrollment.device_id or registration_id
        hub = enrollment.assigned_hub or self.hub.hostname
        issued: list[str] = []
        hub_credential = attestation.device_credential
        if operation.csr is not None and self.issuing_ca is not None:
            ca = self.issuing_ca
            cert = issue_from_csr(ca, operation.csr, self.issued_validity)
            issued = [base64.b64encode(c.public_bytes(Encoding.DER)).decode()
                      for c in (cert, ca.cert, *ca.chain)]  # fmt: skip
            # The hub now knows the device by its operational certificate.
            hub_credential = Credential(ca=ca.chain[-1] if ca.chain else ca.cert)
        if hub == self.hub.hostname:
            self.hub.add_identity(device_id, None, hub_credential)
        now = _utc_now()
        state = {
            "registrationId": registration_id,
            "createdDateTimeUtc": self.created.setdefault(registration_id, now),
            "assignedHub": hub,
            "deviceId": device_id,
            "status": "assigned",
            "substatus": "initialAssignment",
            "lastUpdatedDateTimeUtc": now,
            "etag": f'"{uuid.uuid4().hex[:16]}"',
        }
        payload = operation.payload if enrollment.payload is ECHO else enrollment.payload
        if payload is not None:
            state["payload"] = payload
        if issued:
            state["issuedCertificateChain"] = issued
        operation.result = {
            "operationId": operation.operation_id,
            "status": "assigned",
            "registrationState": state,
        }
        self.received.assignments.append(
            AssignmentRecord(registration_id, device_id, hub, enrollment.label)
        )
        log.info("DPS assigned %s to %s as %s (%s)", registration_id, hub, device_id,
                 enrollment.label)  # fmt: skip
        return operation.result

    def _record(
        self, session: Session, payload: Any, status: int, operation_id: str | None = None
    ) -> None:
        self.received.registrations.append(
            RegistrationRecord(session.client_id, payload, status, operation_id)
        )


def _operation_id() -> str:
    return f"4.{uuid.uuid4().hex[:16]}.{uuid.uuid4()}"


def _payload_of(body: bytes) -> Any:
    try:
        request = json.loads(body)
    except ValueError:
        return None
    return request.get("payload") if isinstance(request, dict) else None
