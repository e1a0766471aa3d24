"""The module's own Azure identity in `serve`: DPS registration (or a fixed hub), the IoT Hub
connection, and the renewal of its operational certificate.

With `cloud.issue_cert: L` the hub connection uses the certificate DPS issued for a key in the
HSM, and `renewal.Renewer` keeps it fresh. At start the newest complete generation of `L` is the
credential; what an interrupted renewal left is tidied away once the connection is up; an
already expired certificate is renewed before connecting (the hub would refuse it).
Renewal state goes to the identity's own device twin and to whoever else asks (the module twin
under IoT Edge), under `credentials.<label>.renewal`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from azure.iot.device import Message
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .. import events, times
from ..config import CloudConfig
from ..hsm import HsmState, TokenPair, one_token
from ..identity import x509 as x509_id
from ..keystore import KeyStore
from ..threads import Worker
from ..twinvalues import renewal_entries
from . import dps_client, renewal
from .dps import Assignment, DpsRequest, Exchange, Provisioner
from .hub import HubClient, HubIdentity

log = logging.getLogger("spyrus_hsm")
RETRY_SECONDS = 10.0
MOVE_CLOSE_SECONDS = 2.0  # for the token-move thread at stop (a switch in progress is the hub's to bound)
RenewalListener = Callable[[str, dict[str, Any]], None]  # (base label, renewal state)
HubFactory = Callable[..., HubClient]  # HubClient(keys, identity, sas_ttl=…); tests hand in their own


class CloudConnection:
    def __init__(self, cfg: CloudConfig, hsm: KeyStore, state_dir: Path, load_provider: Callable[[], None],
                 token_label: Callable[[], str], hub_factory: HubFactory = HubClient,
                 exchange: Exchange = dps_client.register) -> None:
        self.cfg = cfg
        self.hsm = hsm
        self.hub_factory = hub_factory
        self.exchange = exchange
        self.state_dir = state_dir
        self.tls_dir = state_dir / "tls"
        self.load_provider = load_provider
        self.token_label = token_label
        self.hub: HubClient | None = None
        self.assigned_hub: str | None = None
        self.renewer: renewal.Renewer | None = None
        self.renew_at = cfg.renew_at
        self._listeners: list[RenewalListener] = []
        self._last_state: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._publishing = threading.Lock()  # stop() against a connect publishing its client
        ca = cfg.server_ca_file
        self._ca_pem = Path(ca).read_text() if ca else None
        # An operational certificate issued through DPS replaces the onboarding credential.
        self.operational = cfg.issue_cert if cfg.id_scope and cfg.registration_id else None
        # Two tokens and an X.509 identity: (its label, the token whose key the connection uses);
        # when that token goes, the mover connects with the other token's key and certificate.
        self._x509: tuple[str, KeyStore] | None = None
        self._move_wanted = threading.Event()
        self._mover = Worker("cloud-token-move", self._move_loop, on_close=self._move_wanted.set)
        if isinstance(hsm, TokenPair):
            hsm.add_listener(self._token_state)

    def add_renewal_listener(self, fn: RenewalListener) -> None:
        """`fn(label, state)` on every change of the renewal state, the latest one at once."""
        with self._lock:
            self._listeners.append(fn)
            last = self._last_state
        if last is not None and self.operational:
            fn(self.operational, last)

    def set_renew_at(self, renew_at: float) -> None:
        self.renew_at = renew_at
        if self.renewer is not None:
            self.renewer.set_renew_at(renew_at)

    def run(self) -> None:
        """Waits for the HSM, registers (or reuses the registration) and connects; retried until
        it succeeds or `stop()`."""
        while not self._stopping.is_set():
            if not self.hsm.state.ready:
                self._stopping.wait(0.5)
                continue
            try:
                self._connect()
                return
            except Exception as exc:
                log.warning("cloud connection failed: %s; retrying in %g s", exc, RETRY_SECONDS)
                self._stopping.wait(RETRY_SECONDS)

    def stop(self) -> None:
        with self._publishing:  # a connect finishing now sees the stop and publishes nothing
            self._stopping.set()
            renewer, hub = self.renewer, self.hub
        self._mover.close(MOVE_CLOSE_SECONDS)
        if renewer is not None:
            renewer.stop()
        if hub is not None:
            hub.shutdown()

    # --- internals -----------------------------------------------------------------------------

    def _request(self, issue_cert: str | None) -> DpsRequest:
        return DpsRequest.onboarding(self.cfg, self._ca_pem, issue_cert)

    def _connect(self) -> None:
        c = self.cfg
        if c.attestation == "x509" or self.operational:
            self.load_provider()
        provisioner = Provisioner(self.hsm, self.state_dir, self.load_provider, self.exchange)
        in_use = known = None
        began = renewal.now()
        if self.operational:
            renewal.tidy(self.hsm, self.operational, tls_dir=self.tls_dir)
            known = renewal.current(self.hsm, self.operational)
            in_use = self._not_expired(known, provisioner)
        hub, device_id, key = c.hub, c.device_id, c.key
        if c.id_scope and c.registration_id:
            label = in_use.label if in_use else self.operational
            a = provisioner.register(self._request(label), timeout=c.registration_timeout)
            hub, device_id, key = a.assigned_hub, a.device_id, a.key
        assert hub and device_id and key
        files = None
        if c.attestation == "x509" or self.operational:
            label = (in_use.label if in_use else self.operational) or key
            keys = one_token(self.hsm, label)  # two tokens: the key and its chain from one of them
            cred = x509_id.select(keys, label=label)
            files = x509_id.write_tls_files(cred, self.token_label() if keys is self.hsm else
                                            keys.state.token_label or "", self.tls_dir)
            in_use = cred if self.operational else None
            if keys is not self.hsm:
                self._x509 = (label, keys)
        identity = HubIdentity(hub, device_id, c.module_id, sas_key=None if files else key,
                               x509=files, server_ca_pem=self._ca_pem)
        client = self.hub_factory(self.hsm, identity, sas_ttl=c.sas_ttl).connect()
        try:
            log.info("connected to IoT Hub %s as %s", hub, device_id)
            renewer, leftovers = None, False
            if self.operational and in_use is not None:
                leftovers = not self._tidy_after_connect(in_use)
                renewer = renewal.Renewer(
                    self.hsm, provisioner, self._request(self.operational), self._switch,
                    renew_at=self.renew_at, backoff=renewal.retry_backoff(c.renew_retry_initial, c.renew_retry_max),
                    timeout=c.registration_timeout, tls_dir=self.tls_dir, report=self._report,
                    announce=self._announce)
        except BaseException:
            client.shutdown()  # never a second client for this identity on the next try
            raise
        # Published only now, and only if no stop() came meanwhile: stop() shuts down what is
        # here, and the renewer moves this client.
        with self._publishing:
            stopped = self._stopping.is_set()
            if not stopped:
                self.assigned_hub, self.hub = hub, client
                if self._x509 is not None:
                    self._mover.start()
                if renewer is not None:
                    assert in_use is not None
                    received = began if known is None or known.leaf != in_use.leaf else None
                    self.renewer = renewer.start(in_use, received=received, leftovers=leftovers)
        if stopped:
            log.info("stopped while connecting: the new hub connection is closed again")
            client.shutdown()

    # --- two tokens: the X.509 connection follows the token that serves ---------------------------

    def _token_state(self, state: HsmState) -> None:
        """A token pair listener: the token whose key the connection uses is gone and the other
        serves (on an HSM thread: only wakes the mover)."""
        if self._x509 is not None and self._move_target() is not None:
            self._move_wanted.set()

    def _move_target(self) -> KeyStore | None:
        assert self._x509 is not None
        label, keys = self._x509
        other = one_token(self.hsm, label)
        if keys.state.ready or other is keys or not other.state.ready:
            return None
        return other

    def _move_loop(self) -> None:
        while not self._mover.stopping:
            self._move_wanted.wait()
            self._move_wanted.clear()
            if self._mover.stopping or self._x509 is None or self.hub is None:
                continue
            target = self._move_target()
            if target is None:
                continue
            label = self._x509[0]
            try:
                cred = x509_id.select(target, label=label)
                files = x509_id.write_tls_files(cred, target.state.token_label or "", self.tls_dir)
                self.hub.switch(replace(self.hub.identity, x509=files))
            except Exception as exc:  # the next state change, or the retry below, tries again
                log.warning("the IoT Hub connection could not move to token '%s''s key '%s': %s; retrying in %g s",
                            target.state.token_label, label, exc, RETRY_SECONDS)
                if not self._mover.stop_event.wait(RETRY_SECONDS):
                    self._move_wanted.set()
                continue
            self._x509 = (label, target)
            log.warning("the IoT Hub connection moved to token '%s''s key '%s' (the other token is missing)",
                        target.state.token_label, label)

    def _tidy_after_connect(self, in_use: x509_id.X509Credential) -> bool:
        """Delete the generations of the operational credential other than `in_use`; False if
        one could not be deleted now (the renewal thread then keeps trying)."""
        assert self.operational
        try:
            for old in renewal.tidy(self.hsm, self.operational, keep=in_use.label, tls_dir=self.tls_dir):
                log.info("removed '%s', an earlier generation of '%s' no longer in use", old, self.operational)
        except Exception as exc:
            log.warning("earlier generations of '%s' not deleted (the renewal thread retries): %s",
                        self.operational, exc)
            return False
        return True

    def _not_expired(self, cred: x509_id.X509Credential | None,
                     provisioner: Provisioner) -> x509_id.X509Credential | None:
        """`cred`, or, if its certificate has expired, a renewed one (nothing to move yet)."""
        if cred is None or cred.leaf.not_valid_after_utc > renewal.now():
            return cred
        assert self.operational
        log.warning("the operational certificate '%s' expired at %s; renewing it before connecting",
                    cred.label, times.iso(cred.leaf.not_valid_after_utc))
        return renewal.renew_once(self.hsm, provisioner, self._request(self.operational), self.operational,
                                  lambda new, assignment: None, timeout=self.cfg.registration_timeout,
                                  tls_dir=self.tls_dir).credential

    def _switch(self, cred: x509_id.X509Credential, assignment: Assignment) -> None:
        """Connect with the renewed credential; returns once the hub has accepted it (the
        renewal's commit point)."""
        assert self.hub is not None
        files = x509_id.write_tls_files(cred, self.token_label(), self.tls_dir)
        self.hub.switch(replace(self.hub.identity, hostname=assignment.assigned_hub,
                                device_id=assignment.device_id, x509=files))
        self.assigned_hub = assignment.assigned_hub

    def _announce(self, cred: x509_id.X509Credential, previous: x509_id.X509Credential) -> None:
        """After the commit point: the certificate-renewed message on the new connection, and
        the upstream event under IoT Edge. The message carries the new key's hash, by which a
        receiver recognises a copy delivered twice."""
        assert self.hub is not None
        events.certificate_renewed(cred.label, cred.leaf.not_valid_after_utc, previous.leaf.not_valid_after_utc)
        leaf = cred.leaf
        spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        message = Message(json.dumps({"event": "certificateRenewed", "label": cred.label,
                                      "notAfter": times.iso(leaf.not_valid_after_utc),
                                      "issuer": leaf.issuer.rfc4514_string(),
                                      "publicKeySha256": hashlib.sha256(spki).hexdigest()}),
                          content_encoding="utf-8", content_type="application/json")
        message.custom_properties["type"] = "certificate-renewed"
        message.message_id = f"certificate-renewed-{hashlib.sha256(spki).hexdigest()[:32]}"
        self.hub.send(message)

    def _report(self, state: dict[str, Any]) -> None:
        assert self.operational
        with self._lock:
            self._last_state = state
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(self.operational, state)
            except Exception as exc:
                log.debug("renewal state listener failed: %s", exc)
        if self.hub is not None:
            self.hub.report({"credentials": renewal_entries({self.operational: state})})

