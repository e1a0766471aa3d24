"""The MQTT-over-TLS listener: TLS, CONNECT, authentication, sessions, packet dispatch.

Service logic (IoT Hub, DPS) lives in ``hub.py`` and ``dps.py`` behind the small ``Service``
interface; this module owns the connection life cycle and what Azure does at the MQTT level:
CONNACK 5 for bad credentials, closing the connection on protocol violations, QoS 2 or
publishes to topics the identity may not use, dropping an older connection when a client id
connects again, and keeping a CleanSession=0 client's subscriptions for its next connection
(MQTT 3.1.1 §3.1.2.4; IoT Hub and edgeHub do, and azure-iot-device relies on it: it does not
subscribe again after reconnecting — Azure/iotedge#5048).
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import logging
import os
import ssl
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from cryptography import x509

from . import mqtt
from .auth import AuthError, load_chain
from .records import ConnectRecord, DisconnectRecord, Received, SubscriptionRecord

log = logging.getLogger(__name__)

#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME: validity periods are checked after TLS, so an expired
#: device certificate gets CONNACK 5 (CredentialError in the SDK), not a handshake failure.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000


def make_server_context(
    cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]
) -> ssl.SSLContext:
    """TLS >= 1.2 server context that asks for, but does not require, a client certificate.

    Python's ssl has no verify callback, so a presented client certificate must chain to a CA
    in the trust store or the handshake fails; the emulator therefore trusts every CA it knows
    (``trust``) and decides per identity after the handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | _X509_V_FLAG_NO_CHECK_TIME
    return context


def peer_chain(writer: asyncio.StreamWriter) -> list[x509.Certificate]:
    """The client's certificate chain as verified by OpenSSL, leaf first ([] without one).

    Python 3.13 has ``SSLObject.get_verified_chain()``; 3.10-3.12 have it on the private
    ``_sslobj``. Failing both, only the leaf is available (``auth.check_x509`` copes).
    """
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return []
    public = getattr(ssl_object, "get_verified_chain", None)
    private = getattr(getattr(ssl_object, "_sslobj", None), "get_verified_chain", None)
    if public is not None:
        ders = list(public() or [])
    elif private is not None:
        ders = [cert.public_bytes(_ssl.ENCODING_DER) for cert in private() or []]
    else:
        leaf = ssl_object.getpeercert(binary_form=True)
        ders = [leaf] if leaf else []
    return load_chain(ders)


@dataclass
class Authenticated:
    """A successful authentication: how, until when (SAS expiry), and for what."""

    method: str
    identity: Any
    expires_at: float | None = None


class Unanswered(Exception):
    """Raised by ``Service.handle_publish`` to leave a PUBLISH unacknowledged (a hung service)."""


class Service(ABC):
    """One Azure service behind the listener (IoT Hub or DPS)."""

    name: str

    @abstractmethod
    def claims(self, username: str) -> bool:
        """Whether a CONNECT with this username is meant for this service."""

    @abstractmethod
    def authenticate(self, connect: mqtt.Connect, chain: list[x509.Certificate]) -> Authenticated:
        """Check the credentials of ``connect``; raise ``AuthError`` to refuse."""

    @abstractmethod
    def grant(self, session: Session, topic_filter: str, qos: int) -> int:
        """Granted QoS for a subscription, or ``mqtt.SUBACK_FAILURE``."""

    @abstractmethod
    def handle_publish(self, session: Session, packet: mqtt.Publish) -> None:
        """Act on a client PUBLISH; raise ``mqtt.ProtocolError`` to close the connection."""

    def opened(self, session: Session) -> None:  # noqa: B027 - optional hook
        """A session was accepted (after any older one with its client id was closed)."""

    def closed(self, session: Session) -> None:  # noqa: B027 - optional hook
        """The session ended (for cleanup of pending requests)."""


@dataclass(eq=False)
class Session:
    """An accepted MQTT connection: identity, subscriptions, and a way to write to it."""

    service: Service
    client_id: str
    auth: Authenticated
    writer: asyncio.StreamWriter = field(repr=False)
    reader: asyncio.StreamReader = field(repr=False)
    keepalive: int = 60
    subscriptions: dict[str, int] = field(default_factory=dict)
    persistent: bool = False  # CleanSession=0: the subscriptions outlive the connection
    close_reason: str | None = None
    expiry_timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    _next_packet_id: int = 0

    @property
    def identity(self) -> Any:
        return self.auth.identity

    def granted_qos(self, topic: str) -> int | None:
        """Highest QoS of the subscriptions matching ``topic``; None when not subscribed."""
        matches = [q for f, q in self.subscriptions.items() if mqtt.topic_matches(f, topic)]
        return max(matches) if matches else None

    def publish(self, topic: str, payload: bytes | str = b"") -> bool:
        """Deliver to the client if it subscribed to ``topic`` (as a broker would)."""
        qos = self.granted_qos(topic)
        if qos is None or self.close_reason is not None:
            log.debug("%s not subscribed to %s; message dropped", self.client_id, topic)
            return False
        data = payload.encode() if isinstance(payload, str) else payload
        packet_id = self._allocate_packet_id() if qos else None
        self.send(mqtt.encode_publish(mqtt.Publish(topic, data, qos, packet_id)))
        return True

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def close(self, reason: str) -> None:
        """Close from the server side; the serving task records ``reason``."""
        if self.close_reason is None:
            self.close_reason = reason
            log.info("closing %s connection of %s: %s", self.service.name, self.client_id, reason)
        self.writer.close()
        # Wake the serving task now: a TLS close waits for the peer's close_notify.
        self.reader.feed_eof()

    def _allocate_packet_id(self) -> int:
        self._next_packet_id = self._next_packet_id % 0xFFFF + 1
        return self._next_packet_id


class Server:
    """Accepts connections, authenticates them against the services, runs sessions."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        services: list[Service],
        received: Received,
        connect_timeout: float = 10.0,
    ) -> None:
        self.ssl_context = ssl_context
        self.services = services
        self.received = received
        self.connect_timeout = connect_timeout
        self.sessions: dict[tuple[str, str], Session] = {}
        self._stored: dict[tuple[str, str], dict[str, int]] = {}  # persistent sessions' subscriptions
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._close_grace = 1.0  # seconds to wait for the peer's TLS close_notify

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        log.info("listening on %s:%d", host, port)

    async def stop(self) -> None:
        """Stop listening, close every connection, wait briefly for the tasks to end."""
        if self._server is not None:
            self._server.close()
        self._close_grace = 0.1
        for session in list(self.sessions.values()):
            session.close("emulator stopped")
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def session(self, service: str, client_id: str) -> Session | None:
        return self.sessions.get((service, client_id))

    # --- connection life cycle ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        host, port = writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        try:
            if await self._handshake(writer, peer):
                await self._serve_mqtt(reader, writer, peer)
        finally:
            await self._close(writer)
            self._tasks.discard(task)

    async def _handshake(self, writer: asyncio.StreamWriter, peer: str) -> bool:
        try:
            await writer.start_tls(self.ssl_context, ssl_handshake_timeout=self.connect_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            self._record_refusal("", "", "", f"TLS handshake failed: {e}", None, peer)
            return False
        return True

    async def _serve_mqtt(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        session: Session | None = None
        try:
            session = await self._accept(reader, writer, peer)
            if session is None:
                return
            reason = await self._run(session, reader)
        except mqtt.ProtocolError as e:
            log.warning("closing connection from %s: protocol error: %s", peer, e)
            reason = f"protocol error: {e}"
        except TimeoutError:
            reason = f"no CONNECT within {self.connect_timeout} s"
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as e:
            reason = f"connection lost: {e}"
        if session is None:
            self._record_refusal("", "", "", reason, None, peer)
        else:
            self._end(session, reason)

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> Session | None:
        """Read CONNECT, authenticate, answer CONNACK; a Session if accepted, else None."""
        try:
            packet = await asyncio.wait_for(mqtt.read_packet(reader), self.connect_timeout)
        except mqtt.UnacceptableProtocolLevel as e:
            self._record_refusal("", "", "", str(e), 1, peer)
            writer.write(mqtt.encode_connack(mqtt.ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION))
            return None
        if not isinstance(packet, mqtt.Connect):
            raise mqtt.ProtocolError(f"first packet is {type(packet).__name__}, not CONNECT")
        chain = peer_chain(writer)
        service = next((s for s in self.services if s.claims(packet.username or "")), None)
        try:
            if not packet.client_id:
                raise _Refused(mqtt.ConnackCode.IDENTIFIER_REJECTED, "empty client id")
            if service is None:
                raise AuthError(f"username {packet.username!r} names neither the hub nor DPS")
            auth = service.authenticate(packet, chain)
        except (AuthError, _Refused) as e:
            code = e.code if isinstance(e, _Refused) else mqtt.ConnackCode.NOT_AUTHORIZED
            method = "x509" if chain and packet.password is None else "sas"
            name = service.name if service else ""
            self._record_refusal(name, packet.client_id, packet.username, str(e), code, peer, method)
            writer.write(mqtt.encode_connack(code))
            return None
        assert service is not None
        return self._open(service, packet, auth, reader, writer, peer)

    def _open(
        self,
        service: Service,
        packet: mqtt.Connect,
        auth: Authenticated,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> Session:
        key = (service.name, packet.client_id)
        previous = self.sessions.get(key)
        stored = self._stored.pop(key, None)
        if previous is not None and previous.persistent:
            stored = previous.subscriptions
        resumed = None if packet.clean_session else stored
        session = Session(service, packet.client_id, auth, writer, reader, packet.keepalive,
                          dict(resumed or {}), persistent=not packet.clean_session)  # fmt: skip
        if previous is not None:
            previous.close("replaced by a new connection with the same client id")
        self.sessions[key] = session
        service.opened(session)
        # Recorded before CONNACK: a client's connect() may return (and its test look) at once.
        self.received.connects.append(
            ConnectRecord(service.name, packet.client_id, packet.username or "", auth.method,
                          "accepted", 0, peer)
        )  # fmt: skip
        writer.write(mqtt.encode_connack(mqtt.ConnackCode.ACCEPTED, session_present=resumed is not None))
        log.info("%s: %s connected (%s) from %s", service.name, session.client_id, auth.method, peer)
        if auth.expires_at is not None:
            delay = max(0.0, auth.expires_at - time.time())
            session.expiry_timer = asyncio.get_running_loop().call_later(
                delay, session.close, "SAS token expired"
            )
        return session

    async def _run(self, session: Session, reader: asyncio.StreamReader) -> str:
        """Serve packets until the client leaves; returns why the session ended."""
        # MQTT 3.1.1 §3.1.2.10: one and a half keep-alive periods without a packet -> close.
        timeout = session.keepalive * 1.5 if session.keepalive else None
        while True:
            try:
                packet = await asyncio.wait_for(mqtt.read_packet(reader), timeout)
            except TimeoutError:
                return "keep-alive timeout"
            except (asyncio.IncompleteReadError, ConnectionError):
                return session.close_reason or "connection lost"
            if isinstance(packet, mqtt.Disconnect):
                return "client disconnected"
            self._dispatch(session, packet)
            await session.writer.drain()

    def _dispatch(self, session: Session, packet: mqtt.Packet) -> None:
        if isinstance(packet, mqtt.Publish):
            if packet.qos == 2:
                raise mqtt.ProtocolError("QoS 2 PUBLISH (Azure IoT closes the connection)")
            try:
                session.service.handle_publish(session, packet)
            except Unanswered as e:
                log.info("%s", e)
                return
            if packet.qos == 1:
                assert packet.packet_id is not None
                session.send(mqtt.encode_puback(packet.packet_id))
        elif isinstance(packet, mqtt.Subscribe):
            session.send(mqtt.encode_suback(packet.packet_id, self._subscribe(session, packet)))
        elif isinstance(packet, mqtt.Unsubscribe):
            for topic_filter in packet.filters:
                session.subscriptions.pop(topic_filter, None)
            session.send(mqtt.encode_unsuback(packet.packet_id))
        elif isinstance(packet, mqtt.PingReq):
            session.send(mqtt.encode_pingresp())
        elif isinstance(packet, mqtt.Connect):
            raise mqtt.ProtocolError("second CONNECT on a connection")
        # PUBACK: nothing to do, the emulator does not redeliver.

    def _subscribe(self, session: Session, packet: mqtt.Subscribe) -> list[int]:
        codes = []
        for topic_filter, qos in packet.topics:
            granted = session.service.grant(session, topic_filter, qos)
            if granted != mqtt.SUBACK_FAILURE:
                session.subscriptions[topic_filter] = granted
            else:
                log.warning("%s may not subscribe to %s", session.client_id, topic_filter)
            self.received.subscriptions.append(
                SubscriptionRecord(session.service.name, session.client_id, topic_filter, granted)
            )
            codes.append(granted)
        return codes

    def _end(self, session: Session, reason: str) -> None:
        key = (session.service.name, session.client_id)
        if self.sessions.get(key) is session:
            del self.sessions[key]
            if session.persistent:
                self._stored[key] = dict(session.subscriptions)
        session.close_reason = session.close_reason or reason
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
        session.service.closed(session)
        self.received.disconnects.append(
            DisconnectRecord(session.service.name, session.client_id, session.close_reason)
        )
        log.info("%s: %s disconnected: %s", session.service.name, session.client_id,
                 session.close_reason)  # fmt: skip

    def _record_refusal(
        self,
        service: str,
        client_id: str,
        username: str | None,
        reason: str,
        code: int | None,
        peer: str,
        method: str = "none",
    ) -> None:
        log.warning("refused %s connection of %r from %s: %s", service or "a", client_id, peer,
                    reason)  # fmt: skip
        self.received.connects.append(
            ConnectRecord(service, client_id, username or "", method, reason, code, peer)
        )

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), self._close_grace)
        except TimeoutError:
            writer.transport.abort()  # the peer never answered close_notify
        except Exception:
            pass  # the connection is gone either way


class _Refused(Exception):
    """Refuse a CONNECT with a specific CONNACK code other than 5."""

    def __init__(self, code: mqtt.ConnackCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def parse_query(text: str) -> dict[str, str | None]:
    """``a=1&b&c=`` -> {"a": "1", "b": None, "c": ""}, percent-decoded ('+' stays '+')."""
    pairs: dict[str, str | None] = {}
    for part in filter(None, text.split("&")):
        name, sep, value = part.partition("=")
        pairs[unquote(name)] = unquote(value) if sep else None
    return pairs


def split_topic(topic: str) -> tuple[str, dict[str, str | None]]:
    """``path/?query`` -> (``path/``, parsed query)."""
    path, _, query = topic.partition("?")
    return path, parse_query(query)
