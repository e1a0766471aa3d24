"""The module's own Azure identity in `serve`: DPS registration (or a fixed hub), the IoT Hub
connection, and the renewal of its operational certificate.

With `cloud.issue_cert: L` the hub connection uses the certificate DPS issued for a key in the
HSM, and `renewal.Renewer` keeps it fresh. At start the newest complete generation of `L` is the
credential; what an interrupted renewal left is tidied away once the connection is up; an
already expired certificate is renewed before connecting (the hub would refuse it).
Renewal state goes to the identity's own device twin and to whoever else asks (the module twin
under IoT Edge), under `credentials.<label>.renewal`.

With two tokens (docs/two-tokens.md) each token holds its own generations of `L` and its own
DPS-issued certificate (`OperationalToken`: its own registration cache and TLS files, its own
`Renewer`). The connection uses one token's credential; the other token gets one issued once it
is ready (`_standby_loop`), without touching the connection. Each renewer renews its own token's
credential on its own schedule, and only the renewer of the token the connection uses moves the
connection at its commit point; the other's commit point is its certificate stored. When the
token in use goes, the mover switches the connection to the other token's current credential,
and that token's renewer moves it from then on. The second token's renewal is reported under
`renewal.reported_name(L, True)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
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


@dataclass(eq=False)
class OperationalToken:
    """One token's operational credential (`cloud.issue_cert`): its generations are in `keys`
    (one token: with two, a member of the pair, so every step stays on it), its DPS
    registration cache and TLS files are its own."""
    keys: KeyStore
    name: str                    # what its renewal is reported under
    tls_dir: Path
    provisioner: Provisioner
    cred: x509_id.X509Credential | None = None  # its current credential (a commit point moves it)
    renewer: renewal.Renewer | None = None


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
        self.renew_at = cfg.renew_at
        self._listeners: list[RenewalListener] = []
        self._last_state: dict[str, dict[str, Any]] = {}  # renewal name -> its latest state
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
        self._switching = threading.Lock()  # which token the connection uses, and moving it
        # The operational credential: one per token (with one token, the HSM itself).
        members = hsm.members if isinstance(hsm, TokenPair) else (hsm,)
        self._tokens = [self._operational_token(keys, index > 0) for index, keys in enumerate(members)] \
            if self.operational else []
        self._standby = Worker("cloud-standby-token", self._standby_loop)
        if isinstance(hsm, TokenPair):
            hsm.add_listener(self._token_state)

    def _operational_token(self, keys: KeyStore, second: bool) -> OperationalToken:
        assert self.operational
        state_dir = renewal.token_state_dir(self.state_dir, second)
        return OperationalToken(keys, renewal.reported_name(self.operational, second), state_dir / "tls",
                                Provisioner(keys, state_dir, self.load_provider, self.exchange))

    @property
    def renewer(self) -> renewal.Renewer | None:
        """The renewer of the credential the connection uses (None before it is connected)."""
        return next((t.renewer for t in self._tokens if self._uses(t)), None)

    def renewers(self) -> list[tuple[str, renewal.Renewer]]:
        """Every token's renewer running, with the name its state is reported under."""
        return [(t.name, t.renewer) for t in self._tokens if t.renewer is not None]

    def add_renewal_listener(self, fn: RenewalListener) -> None:
        """`fn(label, state)` on every change of the renewal state, the latest one at once."""
        with self._lock:
            self._listeners.append(fn)
            last = dict(self._last_state)
        for name, state in last.items():
            fn(name, state)

    def set_renew_at(self, renew_at: float) -> None:
        self.renew_at = renew_at
        for _, renewer in self.renewers():
            renewer.set_renew_at(renew_at)

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
            renewers, hub = [r for _, r in self.renewers()], self.hub
        self._mover.close(MOVE_CLOSE_SECONDS)
        self._standby.close(MOVE_CLOSE_SECONDS)  # a registration under way is bounded by its own deadline
        for renewer in renewers:
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
        token = self._token_to_connect()  # the operational credential's token (None: none issued)
        provisioner = token.provisioner if token is not None else \
            Provisioner(self.hsm, self.state_dir, self.load_provider, self.exchange)
        in_use = known = None
        began = renewal.now()
        if token is not None:
            known, in_use = self._usable(token)
        hub, device_id, key = c.hub, c.device_id, c.key
        if c.id_scope and c.registration_id:
            label = in_use.label if in_use else self.operational
            a = provisioner.register(self._request(label), timeout=c.registration_timeout)
            hub, device_id, key = a.assigned_hub, a.device_id, a.key
        assert hub and device_id and key
        files = None
        if c.attestation == "x509" or self.operational:
            label = (in_use.label if in_use else self.operational) or key
            # two tokens: the key and its chain from one of them
            keys = token.keys if token is not None else one_token(self.hsm, label)
            cred = x509_id.select(keys, label=label)
            files = x509_id.write_tls_files(cred, self._token_label_of(keys),
                                            token.tls_dir if token is not None else self.tls_dir)
            in_use = cred if self.operational else None
            if keys is not self.hsm:
                self._x509 = (label, keys)
        identity = HubIdentity(hub, device_id, c.module_id, sas_key=None if files else key,
                               x509=files, server_ca_pem=self._ca_pem)
        client = self.hub_factory(self.hsm, identity, sas_ttl=c.sas_ttl).connect()
        try:
            log.info("connected to IoT Hub %s as %s", hub, device_id)
            if self._x509 is not None:
                log.info("the IoT Hub connection uses token '%s''s key '%s'", self._x509[1].state.token_label,
                         self._x509[0])
            renewer, leftovers = None, False
            if token is not None and in_use is not None:
                leftovers = not self._tidy_after_connect(token, in_use)
                renewer = self._renewer(token)
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
                    assert token is not None and in_use is not None
                    token.cred = in_use
                    received = began if known is None or known.leaf != in_use.leaf else None
                    token.renewer = renewer.start(in_use, received=received, leftovers=leftovers)
                if len(self._tokens) > 1:
                    self._standby.start()
        if stopped:
            log.info("stopped while connecting: the new hub connection is closed again")
            client.shutdown()

    # --- two tokens: the X.509 connection follows the token that serves ---------------------------

    def _token_state(self, state: HsmState) -> None:
        """A token pair listener: the token whose key the connection uses is gone and the other
        serves (on an HSM thread: only wakes the mover)."""
        if self._x509 is not None and self._move_target() is not None:
            self._move_wanted.set()

    def _move_target(self) -> tuple[KeyStore, str, Path] | None:
        """(token, label, TLS directory) of the credential to move the connection to: the token
        in use is gone and the other serves (with an operational certificate: the other token's
        current credential, once it has one)."""
        assert self._x509 is not None
        label, keys = self._x509
        if keys.state.ready:
            return None
        if self._tokens:
            return next(((t.keys, t.cred.label, t.tls_dir) for t in self._tokens
                         if t.keys is not keys and t.cred is not None and t.keys.state.ready), None)
        other = one_token(self.hsm, label)
        if other is keys or not other.state.ready:
            return None
        return other, label, self.tls_dir

    def _move_loop(self) -> None:
        while not self._mover.stopping:
            self._move_wanted.wait()
            self._move_wanted.clear()
            if self._mover.stopping or self._x509 is None or self.hub is None:
                continue
            failed = self._move_once()
            if failed is not None:  # the next state change, or the retry below, tries again
                log.warning("the IoT Hub connection could not move to %s; retrying in %g s", failed, RETRY_SECONDS)
                if not self._mover.stop_event.wait(RETRY_SECONDS):
                    self._move_wanted.set()

    def _move_once(self) -> str | None:
        """Move the connection to the other token's credential if it should; what failed, if it did."""
        with self._switching:  # not while a renewal moves it
            target = self._move_target()
            if target is None or self.hub is None:
                return None
            keys, label, tls_dir = target
            try:
                cred = x509_id.select(keys, label=label)
                files = x509_id.write_tls_files(cred, keys.state.token_label or "", tls_dir)
                self.hub.switch(replace(self.hub.identity, x509=files))
            except Exception as exc:
                return f"token '{keys.state.token_label}''s key '{label}': {exc}"
            self._x509 = (label, keys)
        log.warning("the IoT Hub connection moved to token '%s''s key '%s' (the other token is missing)",
                    keys.state.token_label, label)
        return None

    # --- the operational credential, one per token ------------------------------------------------

    def _token_to_connect(self) -> OperationalToken | None:
        """The token whose operational credential the connection uses: the only one; with two,
        the first ready one that holds a complete generation, else the first ready one."""
        if len(self._tokens) < 2:
            return self._tokens[0] if self._tokens else None
        assert self.operational
        ready = [t for t in self._tokens if t.keys.state.ready]
        for t in ready:
            try:
                if renewal.current(t.keys, self.operational) is not None:
                    return t
            except Exception as exc:  # it may just have gone: the other one then
                log.debug("could not read token '%s''s generations of '%s': %s", self._token_label_of(t.keys),
                          self.operational, exc)
        return (ready or self._tokens)[0]

    def _usable(self, token: OperationalToken) -> tuple[x509_id.X509Credential | None,
                                                         x509_id.X509Credential | None]:
        """What an interrupted renewal left in `token` tidied away: (its newest complete
        generation, the credential to use: that one, or renewed if it expired)."""
        assert self.operational
        renewal.tidy(token.keys, self.operational, tls_dir=token.tls_dir)
        known = renewal.current(token.keys, self.operational)
        return known, self._not_expired(token, known)

    def _renewer(self, token: OperationalToken) -> renewal.Renewer:
        assert self.operational
        c = self.cfg
        return renewal.Renewer(
            token.keys, token.provisioner, self._request(self.operational), partial(self._move, token),
            renew_at=self.renew_at, backoff=renewal.retry_backoff(c.renew_retry_initial, c.renew_retry_max),
            timeout=c.registration_timeout, tls_dir=token.tls_dir, report=partial(self._report, token.name),
            announce=partial(self._announce, token), name=token.name)

    def _uses(self, token: OperationalToken) -> bool:
        """Whether the connection uses `token`'s credential (one token: always)."""
        return self._x509 is None or self._x509[1] is token.keys

    def _move(self, token: OperationalToken, cred: x509_id.X509Credential, assignment: Assignment) -> None:
        """A renewal's move: the connection moved to the renewed credential if it uses this
        token's (the commit point: the hub accepted it), else only noted as the token's current one."""
        with self._switching:
            if self._uses(token):
                self._switch(token, cred, assignment)
            token.cred = cred

    def _standby_loop(self) -> None:
        """Two tokens: each token the connection does not use gets its credential ready (issued
        through DPS if it has none) and its renewer, once it is ready; retried until it is."""
        while not self._standby.stopping:
            waiting = [t for t in self._tokens if t.renewer is None]
            if not waiting:
                return
            for token in waiting:
                if not token.keys.state.ready or self._standby.stopping:
                    continue
                try:
                    self._prepare_standby(token)
                except Exception as exc:
                    log.warning("token '%s''s own operational certificate '%s' is not ready: %s; retrying in %g s",
                                self._token_label_of(token.keys), self.operational, exc, RETRY_SECONDS)
                    self._standby.stop_event.wait(RETRY_SECONDS)
            self._standby.stop_event.wait(0.5)

    def _prepare_standby(self, token: OperationalToken) -> None:
        assert self.operational
        began = renewal.now()
        known, cred = self._usable(token)
        if cred is None:
            log.info("token '%s' holds no certificate for '%s': DPS issues one for a key generated there",
                     self._token_label_of(token.keys), self.operational)
            token.provisioner.register(self._request(self.operational), timeout=self.cfg.registration_timeout)
            cred = x509_id.select(token.keys, label=self.operational)
        leftovers = not self._tidy_after_connect(token, cred)
        renewer = self._renewer(token)
        with self._publishing:
            if self._stopping.is_set():
                return
            with self._switching:
                token.cred = cred
            received = began if known is None or known.leaf != cred.leaf else None
            token.renewer = renewer.start(cred, received=received, leftovers=leftovers)
        self._token_state(self.hsm.state)  # the token in use may have gone meanwhile: this one takes over
        log.info("token '%s' holds its own operational certificate '%s' (valid until %s), renewed on its own "
                 "as '%s'", self._token_label_of(token.keys), cred.label,
                 times.iso(cred.leaf.not_valid_after_utc), token.name)

    def _token_label_of(self, keys: KeyStore) -> str:
        return self.token_label() if keys is self.hsm else keys.state.token_label or ""

    def _tidy_after_connect(self, token: OperationalToken, in_use: x509_id.X509Credential) -> bool:
        """Delete the generations of the operational credential other than `in_use`; False if
        one could not be deleted now (the renewal thread then keeps trying)."""
        assert self.operational
        try:
            for old in renewal.tidy(token.keys, self.operational, keep=in_use.label, tls_dir=token.tls_dir):
                log.info("removed '%s', an earlier generation of '%s' no longer in use", old, token.name)
        except Exception as exc:
            log.warning("earlier generations of '%s' not deleted (the renewal thread retries): %s",
                        token.name, exc)
            return False
        return True

    def _not_expired(self, token: OperationalToken,
                     cred: x509_id.X509Credential | None) -> x509_id.X509Credential | None:
        """`cred`, or, if its certificate has expired, a renewed one (nothing to move yet)."""
        if cred is None or cred.leaf.not_valid_after_utc > renewal.now():
            return cred
        assert self.operational
        log.warning("the operational certificate '%s' expired at %s; renewing it before connecting",
                    cred.label, times.iso(cred.leaf.not_valid_after_utc))
        return renewal.renew_once(token.keys, token.provisioner, self._request(self.operational),
                                  self.operational, lambda new, assignment: None,
                                  timeout=self.cfg.registration_timeout, tls_dir=token.tls_dir,
                                  name=token.name).credential

    def _switch(self, token: OperationalToken, cred: x509_id.X509Credential, assignment: Assignment) -> None:
        """Connect with the renewed credential; returns once the hub has accepted it (the
        renewal's commit point)."""
        assert self.hub is not None
        files = x509_id.write_tls_files(cred, self._token_label_of(token.keys), token.tls_dir)
        self.hub.switch(replace(self.hub.identity, hostname=assignment.assigned_hub,
                                device_id=assignment.device_id, x509=files))
        self.assigned_hub = assignment.assigned_hub
        if self._x509 is not None:
            self._x509 = (cred.label, token.keys)

    def _announce(self, token: OperationalToken, cred: x509_id.X509Credential,
                  previous: x509_id.X509Credential) -> None:
        """After the commit point: the certificate-renewed message on the new connection, and
        the upstream event under IoT Edge. The message carries the new key's hash, by which a
        receiver recognises a copy delivered twice; with two tokens also the token's label (a
        standby token's renewal is announced too, on the connection the other token's
        credential holds)."""
        assert self.hub is not None
        events.certificate_renewed(cred.label, cred.leaf.not_valid_after_utc, previous.leaf.not_valid_after_utc)
        leaf = cred.leaf
        spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        body = {"event": "certificateRenewed", "label": cred.label, "notAfter": times.iso(leaf.not_valid_after_utc),
                "issuer": leaf.issuer.rfc4514_string(), "publicKeySha256": hashlib.sha256(spki).hexdigest()}
        if len(self._tokens) > 1:
            body["token"] = self._token_label_of(token.keys)
        message = Message(json.dumps(body), content_encoding="utf-8", content_type="application/json")
        message.custom_properties["type"] = "certificate-renewed"
        message.message_id = f"certificate-renewed-{hashlib.sha256(spki).hexdigest()[:32]}"
        self.hub.send(message)

    def _report(self, name: str, state: dict[str, Any]) -> None:
        with self._lock:
            self._last_state[name] = state
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(name, state)
            except Exception as exc:
                log.debug("renewal state listener failed: %s", exc)
        if self.hub is not None:
            self.hub.report({"credentials": renewal_entries({name: state})})

