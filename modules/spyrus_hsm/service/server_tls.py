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
from ..hsm import Hsm, HsmState, ObjectNotFound
from ..identity import issuing, tls
from ..identity.x509 import chain_pem
from ..threads import Worker

log = logging.getLogger(__name__)
RETRY_MIN, RETRY_MAX = 5.0, 300.0  # seconds between attempts to certify a new key after a failure


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
    the event loop: it reads the HSM and, in the `hsm` placement, loads pkcs11-provider."""

    def __init__(self, cfg: ServiceConfig, hsm: Hsm, tls_dir: Path,
                 load_provider: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._cfg, self._hsm, self._dir, self._clock = cfg, hsm, tls_dir, clock
        self._load_provider = load_provider
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._chain: list[x509.Certificate] = []
        self.not_after: float | None = None   # the in-memory certificate's (issued placement)
        self._renew_at = float("inf")
        self._backoff = Backoff(RETRY_MIN, RETRY_MAX)  # its count: failed attempts in a row
        self.last_error: str | None = None
        self._made_after = hsm.state.recoveries  # the HSM recovery `current` was made after
        self._tried_at = self._made_after        # ... and the last attempt at a new one
        self.placement = self._placement()
        self.current = self._build()
        self.listening = self.current
        self._worker = Worker("api-tls", self._run, on_close=self._wake.set)
        if self.placement is not Placement.FILE:
            self.listening.sni_callback = self._newest
            hsm.add_listener(self._on_hsm_state)
            self._worker.start()

    # --- placement and contexts ---------------------------------------------------------------

    def _placement(self) -> Placement:
        cfg = self._cfg
        if not cfg.tls_key_label:
            return Placement.FILE
        if cfg.tls_cert_file:
            self._chain = x509.load_pem_x509_certificates(Path(cfg.tls_cert_file).read_bytes())
        else:
            try:
                self._chain = self._hsm.certificate_chain(cfg.tls_key_label)
            except ObjectNotFound:
                self._chain = []
        if not self._chain:
            raise TlsSetupError(f"no certificate is stored beside HSM key '{cfg.tls_key_label}'; import one with "
                                "'spyrus-hsm cert import' or set service.tls_cert_file")
        why = issuing.cannot_issue(self._chain[0])
        if why is None:
            log.info("API TLS: short-lived keys in memory, certified by HSM key '%s' for %d s each "
                     "(no token signature per handshake)", cfg.tls_key_label, cfg.tls_lifetime)
            return Placement.ISSUED
        log.warning("API TLS: the certificate beside HSM key '%s' cannot issue (%s), so every new TLS "
                    "connection costs a token signature on the event loop, and the API stops handshaking "
                    "while the token is away; re-issue it as a path-length-0 CA certificate for the "
                    "service's names (see docs/security/api-tls.md)", cfg.tls_key_label, why)
        return Placement.HSM

    def _build(self) -> ssl.SSLContext:
        cfg = self._cfg
        if self.placement is Placement.FILE:
            assert cfg.tls_cert_file and cfg.tls_key_file
            return _client_verification(tls.server_context(cfg.tls_cert_file, cfg.tls_key_file), cfg)
        assert cfg.tls_key_label
        if self.placement is Placement.ISSUED:
            now = self._clock()
            key, chain = issuing.issue(self._hsm, cfg.tls_key_label, self._chain,
                                       dt.timedelta(seconds=cfg.tls_lifetime),
                                       dt.datetime.fromtimestamp(now, dt.UTC))
            ctx = _client_verification(memory_context(key, chain), cfg)
            not_after = chain[0].not_valid_after_utc.timestamp()
            self.not_after, self._renew_at = not_after, now + (not_after - now) / 2
            return ctx
        if self._load_provider is not None:
            self._load_provider()
        self._dir.mkdir(parents=True, exist_ok=True)
        key_file = self._dir / "service.keyref.pem"
        write_atomic(key_file, tls.keyref_pem(tls.key_uri(self._hsm.state.token_label or "", cfg.tls_key_label)))
        cert_file = Path(cfg.tls_cert_file) if cfg.tls_cert_file else self._dir / "service.chain.pem"
        if not cfg.tls_cert_file:
            write_atomic(cert_file, chain_pem(self._chain))
        return _client_verification(tls.server_context(cert_file, key_file), cfg)

    def _newest(self, conn: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if conn.context is not self.current:
            conn.context = self.current

    # --- renewal, on the "api-tls" thread -------------------------------------------------------

    def _on_hsm_state(self, state: HsmState) -> None:  # on the pool's supervisor thread
        if state.ready:
            self._wake.set()

    def _due(self) -> float | None:
        """Seconds until the next rebuild (0: now), or None to wait for the HSM."""
        state = self._hsm.state
        back = state.ready and state.recoveries != self._tried_at  # the HSM came back since the last try
        if self.placement is Placement.HSM and self._made_after == state.recoveries:
            return None
        if back and (self._backoff.failures or self.placement is Placement.HSM):
            return 0.0  # the token is back: try now rather than at the back-off's end
        if self._renew_at == float("inf"):
            return None  # nothing scheduled (Event.wait refuses an infinite timeout)
        return max(0.0, self._renew_at - self._clock())

    def _run(self) -> None:
        """One thread makes every new context, so an older attempt can never finish last."""
        while not self._worker.stopping:
            due = self._due()
            self._wake.wait(due)
            self._wake.clear()
            if self._worker.stopping:
                return
            if self._due() != 0.0:
                continue
            self.renew()

    def renew(self) -> None:
        recoveries = self._tried_at = self._hsm.state.recoveries
        try:
            context = self._build()
        except Exception as exc:  # reported, retried; the current context stays
            delay = self._backoff.next()
            self._renew_at = self._clock() + delay
            self.last_error = str(exc)
            log.error("the API's TLS credential could not be renewed: %s; retrying in %g s or when the HSM is back%s",
                      exc, delay, self._expiry_note())
            return
        if self.placement is not Placement.FILE:
            context.sni_callback = self._newest
        self.current = context
        self._made_after, self.last_error = recoveries, None
        self._backoff.reset()
        log.info("API TLS context renewed (%s)", self.placement.value)

    def _expiry_note(self) -> str:
        if self.not_after is None:
            return ""
        return "; the current certificate expires at " + times.iso(dt.datetime.fromtimestamp(self.not_after, dt.UTC))

    # --- state ---------------------------------------------------------------------------------

    def not_serving(self) -> str | None:
        """Why a leaf's handshake would fail now, or None."""
        if self.placement is Placement.HSM and self._made_after != self._hsm.state.recoveries:
            return "the API's TLS context is being renewed after the HSM came back"
        if self.not_after is not None and self._clock() >= self.not_after:
            return "the API's short-lived TLS certificate has expired and a new one could not be certified"
        return None

    def close(self, timeout: float = 1.0) -> bool:
        """Stop the renewal thread (waited for at most `timeout`); True once it has ended."""
        self._hsm.remove_listener(self._on_hsm_state)
        return self._worker.close(timeout)
