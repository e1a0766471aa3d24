"""The API's TLS credentials, in one of three placements of the server key:

- `issued` (the recommended one, with `service.tls_key_label` naming a key whose certificate is
  an issuing one): the key in the HSM certifies a short-lived key pair held only in memory, and
  the handshakes use that. No TLS handshake costs a token signature, none touches PKCS#11, so
  none can block the event loop or wait for a slow token; the API keeps its TLS credential while
  the token is away. A new pair is certified on a thread at half the lifetime (retried, sooner
  once the HSM is back, if the token is away then).
- `hsm` (an existing deployment whose certificate beside `service.tls_key_label` cannot issue):
  pkcs11-provider signs every handshake in the token, on the event loop, as before; a warning
  says what it costs and how to move. After an HSM recovery the context is rebuilt (the
  provider's handles died with the old sessions: pkcs11-provider #494).
- `file`: `service.tls_cert_file` + `service.tls_key_file`.

Handshakes move to the newest context in the SNI callback, which OpenSSL calls for every
ClientHello, with or without a server name.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import times
from ..backoff import Backoff
from ..config import ServiceConfig
from ..errors import Kind, SpyrusError
from ..files import write_atomic
from ..hsm import Hsm, HsmState, ObjectNotFound, one_token
from ..identity import service_ca, tls
from ..identity.x509 import chain_pem
from ..threads import Worker

log = logging.getLogger(__name__)
RETRY_MIN, RETRY_MAX = 5.0, 300.0  # seconds between attempts to certify a new key after a failure
WAKE = 60.0         # the renewal thread reads the wall clock again at least this often
MIN_RENEWAL = 60.0  # seconds: never two renewals closer than this, however short the certificate
RECHECK = 300.0     # seconds: when a new certificate would be of no use, the stored chain is read this often


class Placement(enum.Enum):
    ISSUED = "issued"  # short-lived key in memory, certified by the HSM key
    HSM = "hsm"        # the HSM key itself, through pkcs11-provider
    FILE = "file"      # a key file


class TlsSetupError(SpyrusError, kind=Kind.CONFIG):
    """The API's TLS credential cannot be set up as configured; the message says what to fix."""


def _client_verification(ctx: ssl.SSLContext, cfg: ServiceConfig) -> ssl.SSLContext:
    if cfg.client_ca_file and not tls.defer_client_verification(ctx):
        log.warning("client certificates are verified in the TLS handshake (a bad one gets a TLS alert, not a 401)")
        ctx.load_verify_locations(cfg.client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def memory_context(key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> ssl.SSLContext:
    """A server context for an in-memory key: Python's ssl loads keys only from a path, so the
    PEM goes through an anonymous memory file (memfd), closed once loaded; nothing reaches a disk."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + chain_pem(chain)
    fd = os.memfd_create("spyrus-hsm-api-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        path = f"/proc/self/fd/{fd}"
        return tls.server_context(path, path)
    finally:
        os.close(fd)


class ServerTls:
    """The API's TLS context (`listening`, switching each handshake to `current`). Make it off
    the event loop: it reads the HSM and, in the `hsm` placement, loads pkcs11-provider.

    `clock` is the wall clock (certificate validity), `monotonic` the one retries are counted
    on, `wait(event, seconds)` how the renewal thread sleeps until `event` is set or `seconds`
    have passed; tests inject all three."""

    def __init__(self, cfg: ServiceConfig, hsm: Hsm, tls_dir: Path,
                 load_provider: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 wait: Callable[[threading.Event, float], object] = threading.Event.wait) -> None:
        self._cfg, self._hsm, self._dir, self._clock = cfg, hsm, tls_dir, clock
        # The token whose service key certifies, with its chain (with two tokens, each has its own).
        self._member = one_token(hsm, cfg.tls_key_label) if cfg.tls_key_label else hsm
        self._monotonic, self._wait = monotonic, wait
        self._load_provider = load_provider
        self._wake = threading.Event()
        self._attempted = threading.Condition()  # the thread made an attempt (`attempts` moved)
        self._forced = False
        self.attempts = 0
        self._chain: list[x509.Certificate] = []
        self.not_before: float | None = None  # the in-memory certificate's validity (issued placement)
        self.not_after: float | None = None
        self._renew_at = float("inf")       # wall clock: half of the current certificate's life
        self._hold_until: float | None = None  # monotonic: no attempt before (back-off, or nothing to gain)
        self._backoff = Backoff(RETRY_MIN, RETRY_MAX)  # its count: failed attempts in a row
        self.last_error: str | None = None  # why the last attempt failed (None once one succeeds)
        self.held: str | None = None        # why no new certificate is being made, when none is
        self._chain_note: str | None = None  # what the last re-read of the service chain found wrong
        self._made_after = hsm.state.recoveries  # the HSM recovery `current` was made after
        self._tried_at = self._made_after        # ... and the last attempt at a new one
        self.placement = self._placement()
        self.current = self._build(self._chain)
        self.listening = self.current
        self._worker = Worker("api-tls", self._run, on_close=self._wake.set)
        if self.placement is not Placement.FILE:
            self.listening.sni_callback = self._newest
            hsm.add_listener(self._on_hsm_state)
            self._worker.start()

    # --- placement and contexts ---------------------------------------------------------------

    def _read_chain(self) -> list[x509.Certificate]:
        """The service certificate and its issuers: tls_cert_file, or those stored beside the key."""
        cfg = self._cfg
        if cfg.tls_cert_file:
            return x509.load_pem_x509_certificates(Path(cfg.tls_cert_file).read_bytes())
        try:
            return self._member.certificate_chain(cfg.tls_key_label or "")
        except ObjectNotFound:
            return []

    def _placement(self) -> Placement:
        cfg = self._cfg
        if not cfg.tls_key_label:
            return Placement.FILE
        self._chain = self._read_chain()
        if not self._chain:
            raise TlsSetupError(f"no certificate is stored beside HSM key '{cfg.tls_key_label}'; import one with "
                                "'spyrus-hsm cert import' or set service.tls_cert_file")
        found = service_ca.review(self._chain[0], self._now())
        if found.refused:
            raise TlsSetupError(
                f"the certificate beside HSM key '{cfg.tls_key_label}' is a CA certificate the API will not certify "
                f"with: {'; '.join(found.refused)}. Re-issue it with basicConstraints CA and path length 0, keyUsage "
                "keyCertSign, extendedKeyUsage serverAuth only and the service's DNS names and addresses in "
                "subjectAltName, then import it (see docs/security/api-tls.md)")
        if found.not_issuing is None:
            log.info("API TLS: short-lived keys in memory, certified by HSM key '%s' for %d s each "
                     "(no token signature per handshake)", cfg.tls_key_label, cfg.tls_lifetime)
            for warning in found.warnings:
                log.warning("API TLS: the certificate beside HSM key '%s': %s (see docs/security/api-tls.md)",
                            cfg.tls_key_label, warning)
            return Placement.ISSUED
        log.warning("API TLS: the certificate beside HSM key '%s' cannot issue (%s), so every new TLS "
                    "connection costs a token signature on the event loop, and the API stops handshaking "
                    "while the token is away; re-issue it as a path-length-0 CA certificate for the "
                    "service's names (see docs/security/api-tls.md)", cfg.tls_key_label, found.not_issuing)
        return Placement.HSM

    def _build(self, chain: list[x509.Certificate]) -> ssl.SSLContext:
        cfg = self._cfg
        if self.placement is Placement.FILE:
            assert cfg.tls_cert_file and cfg.tls_key_file
            return _client_verification(tls.server_context(cfg.tls_cert_file, cfg.tls_key_file), cfg)
        assert cfg.tls_key_label
        if self.placement is Placement.ISSUED:
            now = self._clock()
            key, issued = service_ca.issue(self._member, cfg.tls_key_label, chain,
                                        dt.timedelta(seconds=cfg.tls_lifetime),
                                        dt.datetime.fromtimestamp(now, dt.UTC))
            ctx = _client_verification(memory_context(key, issued), cfg)
            self.not_before = issued[0].not_valid_before_utc.timestamp()
            self.not_after = not_after = issued[0].not_valid_after_utc.timestamp()
            self._renew_at = now + max(MIN_RENEWAL, (not_after - now) / 2)
            self._chain = chain
            return ctx
        if self._load_provider is not None:
            self._load_provider()
        self._dir.mkdir(parents=True, exist_ok=True)
        key_file = self._dir / "service.keyref.pem"
        write_atomic(key_file, tls.keyref_pem(tls.key_uri(self._hsm.state.token_label or "", cfg.tls_key_label)))
        cert_file = Path(cfg.tls_cert_file) if cfg.tls_cert_file else self._dir / "service.chain.pem"
        if not cfg.tls_cert_file:
            write_atomic(cert_file, chain_pem(chain))
        return _client_verification(tls.server_context(cert_file, key_file), cfg)

    def _newest(self, conn: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if conn.context is not self.current:
            conn.context = self.current

    # --- renewal, on the "api-tls" thread -------------------------------------------------------

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    def _on_hsm_state(self, state: HsmState) -> None:  # on the pool's supervisor thread
        if state.ready:
            self._wake.set()

    def _valid_at(self, now: float) -> bool:
        """Whether the current short-lived certificate is valid at wall-clock `now`."""
        if self.not_before is None or self.not_after is None:
            return True
        return self.not_before <= now < self.not_after

    def _due(self) -> float | None:
        """Seconds until the next attempt (0: now), or None to wait for the HSM. Read again at
        every wake, at least every WAKE seconds: the wall clock may have stepped (a gateway
        without a real-time clock booting with a stale date, then NTP) or the device slept."""
        state = self._hsm.state
        back = state.ready and state.recoveries != self._tried_at  # the HSM came back since the last try
        if self.placement is Placement.HSM:
            if self._made_after == state.recoveries:
                return None
            return 0.0 if back else self._held_for()
        if back and self._backoff.failures:
            return 0.0  # the token is back: try now rather than at the back-off's end
        held = self._held_for()
        if held > 0:
            return held
        now = self._clock()
        if not self._valid_at(now):
            return 0.0  # the wall clock moved past its end (or before its start): at once
        return max(0.0, self._renew_at - now)

    def _held_for(self) -> float:
        return 0.0 if self._hold_until is None else max(0.0, self._hold_until - self._monotonic())

    def _run(self) -> None:
        """One thread makes every new context, so an older attempt can never finish last."""
        while not self._worker.stopping:
            due = self._due()
            self._wait(self._wake, WAKE if due is None else min(due, WAKE))
            self._wake.clear()
            if self._worker.stopping:
                return
            if self._forced or self._due() == 0.0:
                self._forced = False
                self._renew()
                with self._attempted:
                    self.attempts += 1
                    self._attempted.notify_all()

    def renew_now(self, timeout: float = 30.0) -> bool:
        """Have the renewal thread make one attempt now, whatever is due; True once it has
        (False after `timeout`, or without a thread: the file placement). Only that thread ever
        makes a context, so an older attempt can never finish last."""
        with self._attempted:
            target = self.attempts + 1
            self._forced = True
            self._wake.set()
            return self._attempted.wait_for(lambda: self.attempts >= target, timeout)

    def _renew(self) -> None:
        """One attempt at a new context (in the issued placement: a new short-lived certificate,
        certified with the service chain as it is stored now)."""
        recoveries = self._tried_at = self._hsm.state.recoveries
        self._hold_until = None
        try:
            if self.placement is Placement.ISSUED:
                self._follow_ready_token()
            chain = self._renewal_chain() if self.placement is Placement.ISSUED else self._chain
            if chain is None:
                return
            context = self._build(chain)
        except Exception as exc:  # reported, retried; the current context stays
            delay = self._backoff.next()
            self._hold_until = self._monotonic() + delay
            self.last_error = str(exc)
            log.error("the API's TLS credential could not be renewed: %s; retrying in %g s or when the HSM is back%s",
                      exc, delay, self._expiry_note())
            return
        if self.placement is not Placement.FILE:
            context.sni_callback = self._newest
        self.current = context
        self._made_after, self.last_error, self.held = recoveries, None, None
        self._backoff.reset()
        log.info("API TLS context renewed (%s)%s", self.placement.value, self._expiry_note())

    def _follow_ready_token(self) -> None:
        """Two tokens, the one whose service key certified so far missing: certify with the
        other's service key and its own chain from now on (a token alone: nothing to do)."""
        label = self._cfg.tls_key_label or ""
        if self._member.state.ready:
            return
        other = one_token(self._hsm, label)
        if other is self._member or not other.state.ready:
            return
        chain = other.certificate_chain(label)
        found = service_ca.review(chain[0], self._now()) if chain else None
        if found is None or found.refused or found.not_issuing:
            why = "no certificate" if found is None else found.not_issuing or "; ".join(found.refused)
            log.error("API TLS: token %s cannot take over certifying the API's keys: the certificate beside its key "
                      "'%s': %s", other.state.name, label, why)
            return
        log.warning("API TLS: token %s is missing; the service key '%s' on token %s certifies from now on",
                    self._member.state.name, label, other.state.name)
        self._member, self._chain = other, chain

    def _renewal_chain(self) -> list[x509.Certificate] | None:
        """The service chain to certify the next key with: the one stored now when it can
        certify (a service certificate replaced in the token is used without a restart), else
        the one in use. None, said once, when no new certificate would be of any use."""
        label, now = self._cfg.tls_key_label, self._now()
        stored = self._read_chain()
        if stored and stored[0] == self._chain[0]:
            self._chain_note = None
        elif stored:
            found = service_ca.review(stored[0], now)
            why = found.not_issuing or "; ".join(found.refused)
            if not why and stored[0].public_key() != self._chain[0].public_key():
                why = "it is not the key's: its public key differs"
            if not why:
                log.info("API TLS: the certificate beside HSM key '%s' was replaced (now valid until %s): "
                         "renewals use it", label, times.iso(stored[0].not_valid_after_utc))
                for warning in found.warnings:
                    log.warning("API TLS: the certificate beside HSM key '%s': %s", label, warning)
                self._chain, self._chain_note = stored, None
            elif why != self._chain_note:
                self._chain_note = why
                log.error("API TLS: the certificate now beside HSM key '%s' cannot certify the API's keys (%s); "
                          "the API keeps the one it had (see docs/security/api-tls.md)", label, why)
        elif self._chain_note != "none":
            self._chain_note = "none"
            log.error("API TLS: no certificate is stored beside HSM key '%s' any more; the API keeps the one it had",
                      label)
        issuer = self._chain[0]
        if self._valid_at(now.timestamp()) and self.not_after is not None \
                and issuer.not_valid_after_utc.timestamp() <= self.not_after:
            self._hold(f"the service certificate beside HSM key '{label}' ends at "
                       f"{times.iso(issuer.not_valid_after_utc)}, as the API's current certificate does: "
                       "a new one could not live longer; re-issue it (see docs/security/api-tls.md)")
            return None
        found = service_ca.review(issuer, now)
        if found.refused:
            self._hold(f"the service certificate beside HSM key '{label}' cannot certify a new key: "
                       f"{'; '.join(found.refused)}; re-issue it (see docs/security/api-tls.md)")
            return None
        return self._chain

    def _hold(self, why: str) -> None:
        """No attempt for RECHECK seconds (the stored chain is read again then); said once."""
        if why != self.held:
            log.warning("API TLS: not renewing: %s%s", why, self._expiry_note())
        self.held = why
        self._hold_until = self._monotonic() + RECHECK

    def _expiry_note(self) -> str:
        if self.not_after is None:
            return ""
        return "; the current certificate expires at " + times.iso(dt.datetime.fromtimestamp(self.not_after, dt.UTC))

    # --- state ---------------------------------------------------------------------------------

    def not_serving(self) -> str | None:
        """Why a leaf's handshake would fail now, or None."""
        if self.placement is Placement.HSM and self._made_after != self._hsm.state.recoveries:
            return "the API's TLS context is being renewed after the HSM came back"
        now = self._clock()
        if self.not_after is None or self._valid_at(now):
            return None
        assert self.not_before is not None
        if now >= self.not_after:
            what = f"the API's short-lived TLS certificate expired at {_iso(self.not_after)}"
        else:
            what = (f"the API's short-lived TLS certificate is valid only from {_iso(self.not_before)} "
                    "(this device's clock was set back)")
        if self.held:
            return f"{what}; no new one is made: {self.held}"
        if self.last_error:
            return f"{what}, and a new one could not be certified: {self.last_error}"
        return f"{what}; a new one is being certified"

    def close(self, timeout: float = 1.0) -> bool:
        """Stop the renewal thread (waited for at most `timeout`); True once it has ended."""
        self._hsm.remove_listener(self._on_hsm_state)
        return self._worker.close(timeout)


def _iso(timestamp: float) -> str:
    return times.iso(dt.datetime.fromtimestamp(timestamp, dt.UTC))
