"""IoT Hub device and module clients whose credential stays in the HSM, kept connected.

- SAS: the token is minted in the HSM and handed to the SDK (`create_from_sastoken`); a renewer
  mints the next one at `renew_at` of the lifetime and gives it to `update_sastoken`. (The
  SDK's own renewal margin is 120 s, useless for short lifetimes.)
- X.509: certificate chain PEM + provider key reference; the TLS handshake signs in the HSM.
- A watchdog rebuilds the client when it stays disconnected (SAS renewal failures left SDK
  clients unable to reconnect until restart: azure-iot-sdk-python #1202, #993), and a new
  client means a new SSLContext, so stale provider key handles after an HSM reset are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from azure.iot.device import X509, IoTHubDeviceClient, IoTHubModuleClient, Message

from ..hsm import Hsm
from ..identity.sas import SasMinter, device_uri
from ..identity.x509 import TlsFiles
from ..threads import call_with_deadline, spawn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubIdentity:
    hostname: str
    device_id: str
    module_id: str | None = None
    sas_key: str | None = None        # HSM key label (SAS) ...
    x509: TlsFiles | None = None      # ... or X.509 files (key reference, no key)
    server_ca_pem: str | None = None
    gateway_hostname: str | None = None


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
                 watch_interval: float = 1.0, sdk_options: dict[str, Any] | None = None) -> None:
        if (identity.sas_key is None) == (identity.x509 is None):
            raise ValueError("a hub identity needs exactly one of sas_key and x509")
        self.hsm = hsm
        self.identity = identity
        self.sas_ttl = sas_ttl
        self.renew_at = renew_at
        self.reconnect_after = reconnect_after
        self.watch_interval = watch_interval
        self.sdk_options = dict(sdk_options or {})  # e.g. keepalive, connection_retry
        self.stats = HubStats()
        self._minter = SasMinter(hsm, min_ttl=1)
        self._client: Any = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------------

    def connect(self) -> HubClient:
        with self._lock:
            self._client = self._connected()
            self.stats.connects += 1
            self.stats.connected_since = time.time()
        if self.identity.sas_key:
            self._threads.append(spawn(self._renew_loop, "hub-sas-renewer"))
        self._threads.append(spawn(self._watchdog, "hub-watchdog"))
        return self

    def shutdown(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.shutdown()
                self._client = None

    @property
    def client(self) -> Any:
        return self._client

    @property
    def connected(self) -> bool:
        c = self._client
        return bool(c is not None and c.connected)

    def send(self, payload: str | bytes | Message) -> None:
        msg = payload if isinstance(payload, Message) else Message(payload)
        with self._lock:
            self._client.send_message(msg)

    def report(self, patch: dict[str, Any], timeout: float = 30.0) -> None:
        """Patch the identity's twin reported properties (raises if not connected or if the hub
        does not answer within `timeout`: the SDK would wait for ever)."""
        with self._lock:
            client = self._client
        if client is None:
            raise ConnectionError("not connected to IoT Hub")
        call_with_deadline(lambda: client.patch_twin_reported_properties(patch), timeout,
                           "reporting to the device twin", "hub-twin-patch")

    def switch(self, identity: HubIdentity) -> None:
        """Move the connection to `identity` (a renewed credential): the old client is shut
        down first (the hub allows one connection per device id, and an old client reconnecting
        would push the new one off), then the new one connects. If it cannot, the previous
        identity is connected again (or left to the watchdog) and the error raised."""
        if (identity.sas_key is None) == (identity.x509 is None):
            raise ValueError("a hub identity needs exactly one of sas_key and x509")
        with self._lock:
            previous, old = self.identity, self._client
            self._client = None
            if old is not None:
                with contextlib.suppress(Exception):
                    old.shutdown()
            self.identity = identity
            try:
                self._client = self._connected()
            except Exception:
                self.identity = previous
                with contextlib.suppress(Exception):
                    self._client = self._connected()
                raise
            self.stats.connects += 1
            self.stats.connected_since = time.time()
        log.info("IoT Hub client %s moved to a new credential", identity.device_id)

    # --- internals ---------------------------------------------------------------------------

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(self.sdk_options)
        if self.identity.server_ca_pem:
            kw["server_verification_cert"] = self.identity.server_ca_pem
        if self.identity.gateway_hostname:
            kw["gateway_hostname"] = self.identity.gateway_hostname
        return kw

    def _token(self) -> str:
        i = self.identity
        return self._minter.mint(i.sas_key or "", device_uri(i.hostname, i.device_id, i.module_id),
                                 self.sas_ttl).token

    def _build(self) -> Any:
        i = self.identity
        cls = IoTHubModuleClient if i.module_id else IoTHubDeviceClient
        if i.sas_key:
            client = cls.create_from_sastoken(self._token(), **self._kwargs())
        else:
            assert i.x509 is not None
            x509 = X509(str(i.x509.cert_file), str(i.x509.key_file))
            extra = {"module_id": i.module_id} if i.module_id else {}
            client = cls.create_from_x509_certificate(x509=x509, hostname=i.hostname,
                                                      device_id=i.device_id, **extra, **self._kwargs())
        return client

    def _connected(self) -> Any:
        """A new client for the current identity, connected (shut down again if it cannot)."""
        client = self._build()
        try:
            client.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    def _renew_loop(self) -> None:
        while not self._stop.wait(max(1.0, self.sas_ttl * self.renew_at)):
            try:
                token = self._token()
                with self._lock:
                    self._client.update_sastoken(token)
                self.stats.renewals += 1
            except Exception as exc:  # the watchdog rebuilds if this leaves us disconnected
                self.stats.last_error = f"SAS renewal failed: {type(exc).__name__}: {exc}"
                log.warning("%s", self.stats.last_error)

    def _watchdog(self) -> None:
        down_since: float | None = None
        while not self._stop.wait(self.watch_interval):
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
                self.stats.last_error = f"reconnect failed: {type(exc).__name__}: {exc}"
                log.warning("IoT Hub client %s: %s", self.identity.device_id, self.stats.last_error)
                down_since = time.monotonic()

    def _rebuild(self) -> None:
        with self._lock:
            old, self._client = self._client, None
            if old is not None:
                with contextlib.suppress(Exception):
                    old.shutdown()
            self._client = self._connected()
            self.stats.rebuilds += 1
            self.stats.connects += 1
            self.stats.connected_since = time.time()
        log.info("IoT Hub client %s rebuilt and connected", self.identity.device_id)
