"""IoT Hub device and module clients whose credential stays in the HSM, kept connected.

- SAS: the token is minted in the HSM and handed to the SDK (`create_from_sastoken`); a renewer
  mints the next one at `renew_at` of the lifetime and gives it to `update_sastoken`. (The
  SDK's own renewal margin is 120 s, useless for short lifetimes.)
- X.509: certificate chain PEM + provider key reference; the TLS handshake signs in the HSM.
- A watchdog rebuilds the client when it stays disconnected (SAS renewal failures left SDK
  clients unable to reconnect until restart: azure-iot-sdk-python #1202, #993), and a new
  client means a new SSLContext, so stale provider key handles after an HSM reset are dropped.
- Every SDK call runs on a helper thread with a deadline (the synchronous SDK waits for ever),
  in a lane that bounds the threads calls that never return can hold, and never under the lock
  the watchdog and shutdown take; what the SDK raises comes out as a `sdk.HubError` naming the
  hub and the reason.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from azure.iot.device import X509, IoTHubDeviceClient, IoTHubModuleClient, Message

from ..hsm import Hsm
from ..identity.sas import SasMinter, device_uri
from ..identity.x509 import TlsFiles
from ..sdkerrors import HubError, HubTimeout, translate
from ..threads import Lane, Worker

log = logging.getLogger(__name__)
CLOSE_WIDTH = 4  # SDK client shutdowns at once (each hung one holds a place until it returns)


@dataclass(frozen=True)
class HubIdentity:
    hostname: str
    device_id: str
    module_id: str | None = None
    sas_key: str | None = None        # HSM key label (SAS) ...
    x509: TlsFiles | None = None      # ... or X.509 files (key reference, no key)
    server_ca_pem: str | None = None
    gateway_hostname: str | None = None

    @property
    def client_id(self) -> str:
        return f"{self.device_id}/{self.module_id}" if self.module_id else self.device_id


@dataclass
class HubStats:
    connects: int = 0
    renewals: int = 0
    rebuilds: int = 0
    last_error: str | None = None
    connected_since: float | None = field(default=None)


class HubClient:
    def __init__(self, hsm: Hsm, identity: HubIdentity, *, sas_ttl: int = 3600,
                 renew_at: float = 0.6, reconnect_after: float = 30.0,
                 watch_interval: float = 1.0, sdk_options: dict[str, Any] | None = None,
                 connect_timeout: float = 60.0, call_timeout: float = 30.0) -> None:
        _check(identity)
        self.hsm = hsm
        self.identity = identity
        self.sas_ttl = sas_ttl
        self.renew_at = renew_at
        self.reconnect_after = reconnect_after
        self.watch_interval = watch_interval
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.sdk_options = dict(sdk_options or {})  # e.g. keepalive, connection_retry
        self.stats = HubStats()
        self._minter = SasMinter(hsm, min_ttl=1)
        self._client: Any = None
        self._lock = threading.Lock()           # guards _client and identity; never held over an SDK call
        self._lifecycle = threading.RLock()     # one connect, switch, rebuild or shutdown at a time
        self._connects = Lane("hub-connect", 2)  # a hung connect leaves room to go back
        self._calls = Lane("hub-call", 2)       # sends, twin patches, SAS updates
        # Closes never queue behind a hung one; a close that does not finish is retried, since an
        # old client still connected reconnects under the same device id and pushes the new one off.
        self._closes = Lane("hub-close", CLOSE_WIDTH)
        self._unclosed: list[Any] = []
        self._retrying: dict[Any, tuple[Future[Any], float]] = {}  # client -> its retry, started when
        self._worker = Worker("hub")              # the SAS renewer and the watchdog
        self._stop = self._worker.stop_event

    # --- lifecycle ---------------------------------------------------------------------------

    def connect(self) -> HubClient:
        with self._lifecycle:
            self._install(self._connected(self.identity))
        if self.identity.sas_key:
            self._worker.spawn(self._renew_loop, "hub-sas-renewer")
        self._worker.spawn(self._watchdog, "hub-watchdog")
        return self

    def shutdown(self) -> None:
        self._worker.close(5)
        # A switch or rebuild still connecting is not waited for long: what it connects after
        # this is shut down rather than installed (`_install`).
        held = self._lifecycle.acquire(timeout=min(5.0, self.connect_timeout))
        try:
            with self._lock:
                client, self._client = self._client, None
            if client is not None:
                self._close(client)
            with self._lock:
                pending, self._unclosed = self._unclosed, []
            for old in pending:  # one more try each, not kept: nothing watches after this
                try:
                    self._closes.call(old.shutdown, self.call_timeout, "closing an old IoT Hub client")
                except Exception as exc:
                    log.debug("IoT Hub client not shut down: %s", exc)
        finally:
            if held:
                self._lifecycle.release()

    @property
    def client(self) -> Any:
        return self._client

    @property
    def connected(self) -> bool:
        c = self._client
        return bool(c is not None and c.connected)

    def send(self, payload: str | bytes | Message) -> None:
        msg = payload if isinstance(payload, Message) else Message(payload)
        client, identity = self._current("sending a message")
        self._sdk(self._calls, lambda: client.send_message(msg), self.call_timeout, "sending a message", identity)

    def report(self, patch: dict[str, Any], timeout: float | None = None) -> None:
        """Patch the identity's twin reported properties (HubError if not connected or if the
        hub does not answer within `timeout`: the SDK would wait for ever)."""
        client, identity = self._current("reporting to the device twin")
        self._sdk(self._calls, lambda: client.patch_twin_reported_properties(patch),
                  timeout or self.call_timeout, "reporting to the device twin", identity)

    def switch(self, identity: HubIdentity) -> None:
        """Move the connection to `identity` (a renewed credential): the old client is shut
        down first (the hub allows one connection per device id, and an old client reconnecting
        would push the new one off), then the new one connects. If it cannot, the previous
        identity is connected again (or left to the watchdog) and the error raised. Returns
        once the hub has accepted the new credential."""
        _check(identity)
        with self._lifecycle:
            with self._lock:
                previous, old = self.identity, self._client
                self._client = None
            if old is not None:
                self._close(old)
            try:
                client = self._connected(identity)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._install(self._connected(previous))
                raise
            with self._lock:
                self.identity = identity
            self._install(client)
        log.info("IoT Hub client %s moved to a new credential", identity.device_id)

    # --- internals ---------------------------------------------------------------------------

    def _install(self, client: Any) -> None:
        with self._lock:
            stopped = self._stop.is_set()  # shut down while it connected
            if not stopped:
                self._client = client
                self.stats.connects += 1
                self.stats.connected_since = time.time()
        if stopped:
            self._close(client)

    def _current(self, what: str) -> tuple[Any, HubIdentity]:
        with self._lock:
            client, identity = self._client, self.identity
        if client is None:
            raise HubError(f"IoT Hub {identity.hostname} ({identity.client_id}): not connected while {what}")
        return client, identity

    def _sdk(self, lane: Lane, fn: Any, seconds: float, what: str, identity: HubIdentity) -> Any:
        """`fn()` (an SDK call) in `lane` within `seconds`, its exceptions translated."""
        try:
            return lane.call(fn, seconds, what)
        except TimeoutError as exc:
            raise HubTimeout(f"IoT Hub {identity.hostname} ({identity.client_id}) did not answer within "
                             f"{seconds:g} s while {what}") from exc
        except Exception as exc:
            raise translate(exc, identity.hostname, identity.client_id, what) from exc

    def _close(self, client: Any) -> bool:
        """Shut an SDK client down, waiting at most `call_timeout`; one that does not finish (or
        cannot start: the lane full of hung closes) is kept and tried again by the watchdog."""
        try:
            self._closes.call(client.shutdown, self.call_timeout, "closing the IoT Hub client")
        except Exception as exc:
            log.warning("IoT Hub client %s: an old client was not shut down (%s); trying again, as it "
                        "would reconnect and push the current connection off", self.identity.device_id, exc)
            with self._lock:
                self._unclosed.append(client)
            return False
        return True

    def _close_unclosed(self) -> None:
        """Another try at the clients whose shutdown did not finish, started without waiting
        (the watchdog must not sit behind a hung shutdown): as many as the close lane has
        places for; the rest, and any that fails again, wait for the next pass."""
        now = time.monotonic()
        with self._lock:
            # a retry still running past call_timeout counts as failed: that client is tried again
            late = [c for c, (f, at) in self._retrying.items() if not f.done() and now - at > self.call_timeout]
            for client in late:
                del self._retrying[client]
            pending, self._unclosed = self._unclosed + late, []
        for i, client in enumerate(pending):
            try:
                started = self._closes.submit(client.shutdown, 0, "closing an old IoT Hub client")
            except TimeoutError:  # every place held by a close that has not returned: next pass
                with self._lock:
                    self._unclosed.extend(pending[i:])
                return
            with self._lock:
                self._retrying[client] = (started, now)
            started.add_done_callback(functools.partial(self._closed_at_last, client))

    def _closed_at_last(self, client: Any, done: Future[Any]) -> None:
        with self._lock:
            if self._retrying.get(client, (None, 0.0))[0] is not done:
                return  # given up on already (tried again meanwhile)
            del self._retrying[client]
            if done.exception() is not None:
                self._unclosed.append(client)
                return
        log.info("IoT Hub client %s: an old client is shut down at last", self.identity.device_id)

    def _kwargs(self, identity: HubIdentity) -> dict[str, Any]:
        kw: dict[str, Any] = dict(self.sdk_options)
        if identity.server_ca_pem:
            kw["server_verification_cert"] = identity.server_ca_pem
        if identity.gateway_hostname:
            kw["gateway_hostname"] = identity.gateway_hostname
        return kw

    def _token(self, identity: HubIdentity) -> str:
        i = identity
        return self._minter.mint(i.sas_key or "", device_uri(i.hostname, i.device_id, i.module_id),
                                 self.sas_ttl).token

    def _build(self, identity: HubIdentity) -> Any:
        i = identity
        cls = IoTHubModuleClient if i.module_id else IoTHubDeviceClient
        try:
            if i.sas_key:
                return cls.create_from_sastoken(self._token(i), **self._kwargs(i))
            assert i.x509 is not None
            x509 = X509(str(i.x509.cert_file), str(i.x509.key_file))
            extra = {"module_id": i.module_id} if i.module_id else {}
            return cls.create_from_x509_certificate(x509=x509, hostname=i.hostname,
                                                    device_id=i.device_id, **extra, **self._kwargs(i))
        except Exception as exc:
            raise translate(exc, i.hostname, i.client_id, "making a client") from exc

    def _connected(self, identity: HubIdentity) -> Any:
        """A new client for `identity`, connected within `connect_timeout` (shut down again if it
        cannot, and also if it connects only after the deadline)."""
        client = self._build(identity)
        guard = threading.Lock()
        state = {"abandoned": False, "connected": False}

        def connect() -> None:
            try:
                client.connect()
            except BaseException:
                with contextlib.suppress(Exception):
                    client.shutdown()
                raise
            with guard:
                state["connected"] = True
                late = state["abandoned"]
            if late:
                with contextlib.suppress(Exception):
                    client.shutdown()

        try:
            self._sdk(self._connects, connect, self.connect_timeout, "connecting", identity)
        except BaseException:
            with guard:
                state["abandoned"] = True
                connected = state["connected"]
            if connected:  # it connected just as the deadline passed
                self._close(client)
            raise
        return client

    def _renew_loop(self) -> None:
        while not self._stop.wait(max(1.0, self.sas_ttl * self.renew_at)):
            try:
                client, identity = self._current("renewing the SAS token")
                token = self._token(identity)
                self._sdk(self._calls, functools.partial(client.update_sastoken, token), self.call_timeout,
                          "renewing the SAS token", identity)
                self.stats.renewals += 1
            except Exception as exc:  # the watchdog rebuilds if this leaves us disconnected
                self.stats.last_error = f"SAS renewal failed: {exc}"
                log.warning("%s", self.stats.last_error)

    def _watchdog(self) -> None:
        down_since: float | None = None
        while not self._stop.wait(self.watch_interval):
            if self._unclosed or self._retrying:
                self._close_unclosed()
            if self.connected:
                down_since = None
                continue
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since < self.reconnect_after:
                continue
            try:
                self._rebuild()
                down_since = None
            except Exception as exc:
                self.stats.last_error = f"reconnect failed: {exc}"
                log.warning("IoT Hub client %s: %s", self.identity.device_id, self.stats.last_error)
                down_since = time.monotonic()

    def _rebuild(self) -> None:
        with self._lifecycle:
            if self._stop.is_set():
                return
            with self._lock:
                old, self._client = self._client, None
                identity = self.identity
            if old is not None:
                self._close(old)
            self._install(self._connected(identity))
            self.stats.rebuilds += 1
        log.info("IoT Hub client %s rebuilt and connected", self.identity.device_id)


def _check(identity: HubIdentity) -> None:
    if (identity.sas_key is None) == (identity.x509 is None):
        raise ValueError("a hub identity needs exactly one of sas_key and x509")
