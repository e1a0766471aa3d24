"""A small Device Provisioning Service client over MQTT (paho-mqtt): one registration, start to
end, on the calling thread, within one overall deadline.

The flow: CONNECT (username `{idScope}/registrations/{id}/api-version=…`, a SAS token as the
password or a TLS client certificate), subscribe to `$dps/registrations/res/#`, PUT the register
request, then GET the operation status until DPS answers "assigned" or "failed". Answers of 429
and above are retried after their retry-after; other answers of 300 and above end it.

Why not the SDK's ProvisioningDeviceClient: its register() cannot be cancelled (its pipeline's
shutdown leaves the polling timers of a pending registration running, and it skips its own
shutdown when the result is not "assigned"), so an abandoned registration kept a thread and a
connection and went on polling with the same client id; and it fixes the api-version and the
request body. Here no thread is started, and whatever ends the registration — an answer, an
error or the deadline — closes the connection before returning.
"""

from __future__ import annotations

import base64
import json
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import paho.mqtt.client as mqtt

from .. import __version__
from ..errors import Kind, SpyrusError

API_VERSION = "2019-03-31"
# Certificate issuance (Azure Device Registry certificate management): the register body may
# carry a CSR, the answer the issued chain. Used only when a CSR is sent.
CERTIFICATE_API_VERSION = "2025-07-01-preview"
PORT = 8883
KEEPALIVE = 60.0
DEFAULT_RETRY_AFTER = 2.0  # seconds, when DPS names none (as the SDK)
RESPONSES = "$dps/registrations/res/#"
REGISTER = "$dps/registrations/PUT/iotdps-register/?$rid={rid}"
OPERATION_STATUS = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}"
CONNACK_NOT_AUTHORIZED = (4, 5)  # bad user name or password, not authorised


class DpsFailure(SpyrusError, kind=Kind.UPSTREAM):
    """Why a registration ended without an assignment (the caller words it for the operator)."""


class Unauthorized(DpsFailure):
    """DPS refused the credential when connecting."""


class Rejected(DpsFailure):
    """DPS answered the request with an error status, or with status "failed"."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {json.dumps(body)}" if body is not None else str(status))
        self.status = status
        self.body = body


class Throttled(Rejected):
    """DPS asked to retry later than the deadline allows (429, or a server error)."""

    def __init__(self, status: int, body: Any, retry_after: float) -> None:
        super().__init__(status, body)
        self.retry_after = retry_after


class Unreachable(DpsFailure):
    """No connection to DPS, or it was lost."""


class DeadlineExceeded(DpsFailure):
    """No answer within the registration's deadline."""


@dataclass(frozen=True)
class DpsTarget:
    """Where to register and with which credential: a SAS token, or the context's certificate."""

    host: str
    id_scope: str
    registration_id: str
    tls: ssl.SSLContext
    sas_token: str | None = field(default=None, repr=False)
    port: int = PORT


def register(target: DpsTarget, payload: Any, timeout: float, csr: bytes | None = None) -> dict[str, Any]:
    """Register `target.registration_id` with `payload`; DPS's final answer ("assigned"), as
    `{"operationId", "status", "registrationState": {...}}`. With `csr` (DER PKCS#10) DPS is
    asked to issue a certificate: the answer's registrationState carries
    `issuedCertificateChain`. Raises a DpsFailure."""
    api_version = API_VERSION if csr is None else CERTIFICATE_API_VERSION
    session = _Session(target, time.monotonic() + timeout, api_version)
    request: dict[str, Any] = {"registrationId": target.registration_id, "payload": payload}
    if csr is not None:
        request["csr"] = base64.b64encode(csr).decode("ascii")
    try:
        session.connect()
        return session.register(request)
    finally:
        session.close()


@dataclass
class _Answer:
    status: int
    body: Any
    retry_after: float | None


class _Session:
    """One MQTT connection to DPS, driven by paho's loop() on the calling thread."""

    def __init__(self, target: DpsTarget, deadline: float, api_version: str = API_VERSION) -> None:
        self.target = target
        self.deadline = deadline
        self.client = mqtt.Client(client_id=target.registration_id, clean_session=True,
                                  protocol=mqtt.MQTTv311)
        user_agent = quote(f"spyrus-hsm/{__version__}", safe="")
        self.client.username_pw_set(f"{target.id_scope}/registrations/{target.registration_id}/"
                                    f"api-version={api_version}&ClientVersion={user_agent}",
                                    target.sas_token)
        self.client.tls_set_context(target.tls)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.connack: int | None = None
        self.subscribed = False
        self.rid = 0
        self.answer: _Answer | None = None

    # --- the registration --------------------------------------------------------------

    def connect(self) -> None:
        # The TLS handshake is bounded by the keepalive (paho's socket timeout while connecting).
        keepalive = max(1, math.ceil(min(KEEPALIVE, self._remaining())))
        try:
            self.client.connect(self.target.host, self.target.port, keepalive=keepalive)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        self._loop_until(lambda: self.connack is not None, "connecting")
        if self.connack in CONNACK_NOT_AUTHORIZED:
            raise Unauthorized(mqtt.connack_string(self.connack or 0))
        if self.connack != 0:
            raise Unreachable(f"connection refused: {mqtt.connack_string(self.connack or 0)}")
        self.client.subscribe(RESPONSES, qos=1)
        self._loop_until(lambda: self.subscribed, "subscribing")

    def register(self, request: dict[str, Any]) -> dict[str, Any]:
        topic, body = REGISTER, json.dumps(request)
        while True:
            answer = self._request(topic, body)
            if answer.status >= 429:  # throttled or a server error: the same request again
                retry_after = answer.retry_after or DEFAULT_RETRY_AFTER
                if retry_after >= self._remaining():  # say so now rather than wait for nothing
                    raise Throttled(answer.status, answer.body, retry_after)
                self._wait(retry_after)
                continue
            if answer.status >= 300:
                raise Rejected(answer.status, answer.body)
            result = answer.body if isinstance(answer.body, dict) else {}
            if result.get("status") == "assigned":
                return result
            if result.get("status") != "assigning" or not result.get("operationId"):
                raise Rejected(answer.status, answer.body)  # "failed", or an answer without sense
            self._wait(answer.retry_after or DEFAULT_RETRY_AFTER)
            topic, body = OPERATION_STATUS.replace("{op}", quote(result["operationId"], safe="")), " "

    def close(self) -> None:
        """Disconnect and close every socket paho opened (its wake-up socket pair as well:
        reinitialise() is the public call that closes it)."""
        self.client.disconnect()
        self.client.reinitialise()

    # --- plumbing ----------------------------------------------------------------------

    def _request(self, topic: str, body: str) -> _Answer:
        self.rid += 1
        self.answer = None
        self.client.publish(topic.replace("{rid}", str(self.rid)), body, qos=1)
        self._loop_until(lambda: self.answer is not None, "waiting for DPS to answer")
        assert self.answer is not None
        return self.answer

    def _wait(self, seconds: float) -> None:
        """Keep the connection serviced for `seconds` (or until the deadline)."""
        until = time.monotonic() + seconds
        self._loop_until(lambda: time.monotonic() >= until, "waiting to retry")

    def _loop_until(self, done: Callable[[], bool], what: str) -> None:
        while not done():
            remaining = self._remaining()
            if remaining <= 0:
                raise DeadlineExceeded(what)
            rc = self.client.loop(timeout=min(1.0, remaining))
            if rc != mqtt.MQTT_ERR_SUCCESS and not done():
                raise Unreachable(f"connection lost while {what}: {mqtt.error_string(rc)}")

    def _remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: int) -> None:
        self.connack = rc

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, granted: Any) -> None:
        self.subscribed = True

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # $dps/registrations/res/{status}/?$rid={rid}[&retry-after={seconds}]
        parts = urlsplit(message.topic)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        segments = parts.path.split("/")
        if query.get("$rid") != str(self.rid) or len(segments) < 4 or not segments[3].isdigit():
            return  # an answer to an earlier request, or not an answer
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = None
        retry_after = query.get("retry-after")
        self.answer = _Answer(int(segments[3]), body,
                              float(retry_after) if retry_after and retry_after.isdigit() else None)
