"""``Emulator``: IoT Hub + DPS on one address, served from a background thread's event loop.

Every public method may be called from any thread: state lives on the emulator's loop and
calls are marshalled there, so tests need no locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from .auth import Credential
from .dps import ECHO, Dps, Enrollment
from .hub import IotHub
from .pki import make_ca
from .records import Received
from .server import Server, make_server_context

log = logging.getLogger(__name__)
T = TypeVar("T")
_CALL_TIMEOUT = 10.0


class Emulator:
    """A local Azure IoT Hub and DPS speaking MQTT 3.1.1 over TLS on ``host:port``.

    ``hub_hostname`` is what IoT Hub usernames and SAS resources must name and what DPS
    assigns (default: ``host``); ``id_scope`` is what DPS usernames and SAS resources name.
    Use as a context manager or call ``start()``/``stop()``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        server_cert: str | os.PathLike[str],
        server_key: str | os.PathLike[str],
        hub_hostname: str | None = None,
        id_scope: str = "0ne00000001",
        port: int = 8883,
        connect_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.hub_hostname = hub_hostname or host
        self.id_scope = id_scope
        self.received = Received()
        self._ssl = make_server_context(server_cert, server_key)
        self._trusted: set[bytes] = set()
        self._hub = IotHub(self.hub_hostname, self.received)
        self._dps = Dps(id_scope, self._hub, self.received)
        # Certificate management: a P-384 root and the issuing CA below it that signs CSRs.
        self._issuing_root = make_ca("Emulator DPS Root CA", curve=ec.SECP384R1())
        self._dps.issuing_ca = make_ca("Emulator DPS Issuing CA", self._issuing_root,
                                       curve=ec.SECP384R1())  # fmt: skip
        self._trust(Credential(ca=self._issuing_root.cert))
        self._server = Server(self._ssl, [self._hub, self._dps], self.received, connect_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> Emulator:
        """Bind and serve; raises (e.g. OSError for a busy address) if the listener fails."""
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet_exception_handler)
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, started), name=f"emulator-{self.host}", daemon=True
        )
        self._thread.start()
        try:
            started.result(_CALL_TIMEOUT)
        except BaseException:
            self._thread.join(_CALL_TIMEOUT)
            self._thread = None
            raise
        self._loop = loop
        return self

    def stop(self) -> None:
        """Close every connection and the listener, end the thread (well under a second)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._server.stop(), loop).result(_CALL_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_CALL_TIMEOUT)
            self._loop = self._thread = None
            log.info("emulator on %s stopped", self.host)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, loop: asyncio.AbstractEventLoop, started: concurrent.futures.Future[None]) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._server.start(self.host, self.port))
        except BaseException as e:
            started.set_exception(e)
            loop.close()
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    # --- identities ---------------------------------------------------------------------------

    def add_device(
        self,
        device_id: str,
        *,
        symmetric_key: str | None = None,
        secondary_key: str | None = None,
        x509_ca_pem: str | bytes | None = None,
    ) -> None:
        """Register an IoT Hub device: SAS (primary/secondary key, base64) or X.509 CA-signed
        (the chain must lead to ``x509_ca_pem`` and the leaf CN must equal ``device_id``)."""
        credential = Credential.make(
            f"device {device_id!r}", symmetric_key, secondary_key, x509_ca_pem
        )
        self._call(lambda: self._add_identity(device_id, None, credential))

    def add_module(
        self,
        device_id: str,
        module_id: str,
        *,
        symmetric_key: str,
        secondary_key: str | None = None,
    ) -> None:
        """Register a module identity (SAS only) of an already registered device."""
        credential = Credential.make(f"module {device_id}/{module_id}", symmetric_key,
                                     secondary_key)  # fmt: skip
        self._call(lambda: self._add_identity(device_id, module_id, credential))

    def add_individual_enrollment(
        self,
        registration_id: str,
        *,
        symmetric_key: str | None = None,
        secondary_key: str | None = None,
        x509_ca_pem: str | bytes | None = None,
        assigned_hub: str | None = None,
        device_id: str | None = None,
        payload: Any = ECHO,
    ) -> None:
        """A DPS individual enrollment. ``assigned_hub`` defaults to this emulator's hub,
        ``device_id`` to the registration id; ``payload`` is returned in registrationState
        (default: the device's own payload echoed back)."""
        credential = Credential.make(
            f"enrollment {registration_id!r}", symmetric_key, secondary_key, x509_ca_pem
        )
        enrollment = Enrollment("individual", registration_id, credential, assigned_hub,
                                device_id, payload)  # fmt: skip
        self._call(lambda: self._add_enrollment(enrollment))

    def add_group_enrollment(
        self,
        name: str,
        *,
        symmetric_key: str | None = None,
        secondary_key: str | None = None,
        x509_ca_pem: str | bytes | None = None,
        assigned_hub: str | None = None,
        payload: Any = ECHO,
    ) -> None:
        """A DPS enrollment group: SAS devices use ``derive_group_key(group_key, regId)``;
        X.509 devices need a chain to ``x509_ca_pem`` with CN == registration id."""
        credential = Credential.make(
            f"enrollment group {name!r}", symmetric_key, secondary_key, x509_ca_pem
        )
        enrollment = Enrollment("group", name, credential, assigned_hub, None, payload)
        self._call(lambda: self._add_enrollment(enrollment))

    def _add_identity(self, device_id: str, module_id: str | None, cred: Credential) -> None:
        self._trust(cred)
        self._hub.add_identity(device_id, module_id, cred)

    def _add_enrollment(self, enrollment: Enrollment) -> None:
        self._trust(enrollment.credential)
        self._dps.add_enrollment(enrollment)

    def _trust(self, credential: Credential) -> None:
        """Let the TLS layer accept chains to this CA; the per-identity check comes later."""
        if credential.ca is None:
            return
        pem = credential.ca.public_bytes(Encoding.PEM)
        if pem not in self._trusted:
            self._ssl.load_verify_locations(cadata=pem.decode())
            self._trusted.add(pem)

    # --- DPS behaviour --------------------------------------------------------------------

    @property
    def certificate_authority(self) -> x509.Certificate:
        """The P-384 root above DPS's issuing CA: issued chains lead to it."""
        return self._issuing_root.cert

    @property
    def issued_validity(self) -> float:
        """Lifetime in seconds of the operational certificates DPS issues (default 30 days)."""
        return self._dps.issued_validity.total_seconds()

    @issued_validity.setter
    def issued_validity(self, seconds: float) -> None:
        self._call(lambda: setattr(self._dps, "issued_validity", dt.timedelta(seconds=seconds)))

    @property
    def polls_before_assigned(self) -> int:
        """Status polls a registration needs before it is assigned (default 1: register
        answers 202 assigning, the first poll 200 assigned). 0: register answers 200."""
        return self._dps.polls_before_assigned

    @polls_before_assigned.setter
    def polls_before_assigned(self, value: int) -> None:
        self._call(lambda: setattr(self._dps, "polls_before_assigned", value))

    def throttle_dps(self, times: int = 1, retry_after: int = 1, status: int = 429) -> None:
        """Answer the next ``times`` DPS requests (register or poll) with 429 and
        ``retry-after``, as a throttled DPS does; the SDK retries after that many seconds.
        Another ``status`` (e.g. 400) answers with that error instead, which is not retried.
        Calls queue up: ``throttle_dps(1, status=401); throttle_dps(1, 8)`` refuses the next
        request with 401 and the one after it with 429."""
        self._call(lambda: self._dps.throttled.extend([(status, retry_after)] * times))

    def stall_dps(self, stalled: bool = True) -> None:
        """Leave DPS requests (register and poll) unanswered, as an overloaded DPS may."""
        self._call(lambda: setattr(self._dps, "stalled", stalled))

    # --- IoT Hub behaviour --------------------------------------------------------------------

    def refuse_hub(self, times: int = 1, *, new_certificates: bool = False) -> None:
        """Refuse the next ``times`` IoT Hub connects with CONNACK 5 (not authorized), whatever
        their credential: a hub that no longer accepts a certificate. With ``new_certificates``,
        only connects presenting a client certificate other than those it accepted before for
        that client id (a renewed one; not the first one): neither the first connects nor
        reconnects with the certificate in use take the refusal, whenever it is armed."""
        attribute = "new_certificate_refusals" if new_certificates else "refusals"
        self._call(lambda: setattr(self._hub, attribute, times))

    def stall_hub(self, stalled: bool = True) -> None:
        """Leave IoT Hub publishes (telemetry, twin requests) unacknowledged, as a hung hub may."""
        self._call(lambda: setattr(self._hub, "stalled", stalled))

    # --- cloud-to-device ----------------------------------------------------------------------

    def send_desired_patch(
        self, device_id: str, patch: dict[str, Any], module_id: str | None = None
    ) -> int:
        """Patch the desired properties, push the patch to the connected client (if it
        subscribed); returns the new desired ``$version``."""
        return self._call(lambda: self._hub.send_desired_patch(device_id, patch, module_id))

    def invoke_method(
        self,
        device_id: str,
        method_name: str,
        payload: Any = None,
        *,
        module_id: str | None = None,
        timeout: float = 5.0,
    ) -> tuple[int, Any]:
        """Direct method: (status, payload) from the device; (404, error) if it is not
        connected and subscribed, (504, error) if it does not answer within ``timeout``."""
        coroutine = self._hub.invoke_method(device_id, method_name, payload, timeout, module_id)
        return self._await(coroutine, timeout + _CALL_TIMEOUT)

    def send_message(
        self,
        device_id: str,
        payload: bytes | str,
        *,
        module_id: str | None = None,
        input_name: str | None = None,
        properties: dict[str, str] | None = None,
    ) -> bool:
        """C2D message (or a module input message); False if the client is not subscribed."""
        return self._call(
            lambda: self._hub.send_message(device_id, payload, module_id, input_name, properties)
        )

    def twin(self, device_id: str, module_id: str | None = None) -> dict[str, Any]:
        """A copy of the twin as a GET returns it: {"desired": {...}, "reported": {...}}."""
        return self._call(lambda: self._hub.identity(device_id, module_id).twin.document())

    def primary_key(self, device_id: str, module_id: str | None = None) -> str:
        """The primary SAS key the hub holds for an identity (what the edge runtime's key
        service signs with for a module; see ``workload``)."""

        def key() -> str:
            keys = self._hub.identity(device_id, module_id).credential.keys
            if not keys:
                raise ValueError(f"{device_id}/{module_id or ''} has no symmetric key")
            return keys[0]

        return self._call(key)

    def is_registered(self, device_id: str, module_id: str | None = None) -> bool:
        client_id = f"{device_id}/{module_id}" if module_id else device_id
        return self._call(lambda: client_id in self._hub.identities)

    def connected(self, service: str = "hub") -> list[str]:
        """Client ids with an open session on ``service`` ("hub" or "dps")."""
        return self._call(lambda: sorted(c for s, c in self._server.sessions if s == service))

    def drop_connection(self, client_id: str, service: str = "hub") -> bool:
        """Close a client's connection from the server side (to test reconnects)."""

        def drop() -> bool:
            session = self._server.session(service, client_id)
            if session is not None:
                session.close("dropped by the test")
            return session is not None

        return self._call(drop)

    def wait_for(
        self, predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.02
    ) -> T:
        """Poll ``predicate`` until it returns something truthy; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)

    # --- plumbing ------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the emulator's loop (or directly when not running)."""
        loop = self._loop
        if loop is None or threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

        loop.call_soon_threadsafe(run)
        return future.result(_CALL_TIMEOUT)

    def _await(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        loop = self._loop
        if loop is None:
            coroutine.close()
            raise RuntimeError("emulator is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """TLS handshake failures are expected in tests and already recorded; keep them quiet."""
    log.debug("event loop: %s", context.get("message"), exc_info=context.get("exception"))
