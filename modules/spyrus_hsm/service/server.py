"""Running the service: the HTTPS listener (server key in a file or in the HSM through
pkcs11-provider), the plain-HTTP loopback health listener for the container's HEALTHCHECK,
and a probe that notices an unplugged HSM even when no request is in flight."""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from pathlib import Path

from aiohttp import web

from ..config import ServiceConfig
from ..errors import Kind, SpyrusError
from ..files import write_atomic
from ..hsm import Hsm, HsmState
from ..identity import tls
from ..identity.x509 import chain_pem
from .app import build_app
from .core import Service
from .keys import API_NOT_SERVING, SERVICE
from .protocol import Runner
from .routes import health

log = logging.getLogger(__name__)
PROBE_INTERVAL = 0.5  # seconds: /readyz turns false within about this after an unplug


def tls_context(cfg: ServiceConfig, hsm: Hsm, tls_dir: Path) -> ssl.SSLContext:
    """The server's TLS context. With tls_key_label the provider must already be loaded and the
    HSM ready; the chain is read from the HSM unless tls_cert_file is given."""
    if cfg.tls_key_label:
        tls_dir.mkdir(parents=True, exist_ok=True)
        key_file = tls_dir / "service.keyref.pem"
        write_atomic(key_file, tls.keyref_pem(tls.key_uri(hsm.state.token_label or "", cfg.tls_key_label)))
        if cfg.tls_cert_file:
            cert_file = Path(cfg.tls_cert_file)
        else:
            chain = hsm.certificate_chain(cfg.tls_key_label)
            if not chain:
                raise ValueError(f"no certificate is stored beside HSM key '{cfg.tls_key_label}'; "
                                 "import one with 'spyrus-hsm cert import' or set service.tls_cert_file")
            cert_file = tls_dir / "service.chain.pem"
            write_atomic(cert_file, chain_pem(chain))
    else:
        assert cfg.tls_cert_file and cfg.tls_key_file
        cert_file, key_file = Path(cfg.tls_cert_file), Path(cfg.tls_key_file)
    ctx = tls.server_context(cert_file, key_file)
    if cfg.client_ca_file and not tls.defer_client_verification(ctx):
        log.warning("client certificates are verified in the TLS handshake (a bad one gets a TLS alert, not a 401)")
        ctx.load_verify_locations(cfg.client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class ServerTls:
    """The API's TLS context, renewed after each HSM recovery when the server key is in the HSM.

    pkcs11-provider keeps using the sessions of a key it loaded, and an HSM replug kills them: a
    context made before the replug can never sign again (pkcs11-provider #494), so every leaf's
    handshake failed until the module was restarted. So once the HSM is back a new context is
    built on a thread, and each handshake moves to the newest one in the SNI callback, which
    OpenSSL calls for every ClientHello, with or without a server name. Make it off the event
    loop (it reads the HSM); `close` stops following the HSM. A key in a file needs none of this.
    """

    def __init__(self, cfg: ServiceConfig, hsm: Hsm, tls_dir: Path) -> None:
        self._cfg, self._hsm, self._dir = cfg, hsm, tls_dir
        self.current = tls_context(cfg, hsm, tls_dir)
        self.listening = self.current  # the context the listening socket is made with
        self._recoveries = hsm.state.recoveries
        self._renewed = hsm.state.recoveries  # the HSM recovery `current` was made after
        self._closed = False
        if cfg.tls_key_label:
            self.listening.sni_callback = self._newest
            hsm.add_listener(self._on_hsm_state)

    def _newest(self, conn: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if conn.context is not self.current:
            conn.context = self.current

    def _on_hsm_state(self, state: HsmState) -> None:  # on the pool's supervisor thread
        if state.ready and state.recoveries != self._recoveries and not self._closed:
            self._recoveries = state.recoveries
            threading.Thread(target=self.renew, args=(state.recoveries,), name="api-tls-renew", daemon=True).start()

    def renew(self, recoveries: int) -> None:
        try:
            self.current = tls_context(self._cfg, self._hsm, self._dir)
        except Exception as exc:
            log.error("the API's TLS context could not be renewed after the HSM came back: %s; "
                      "TLS handshakes fail until the next recovery or a restart", exc)
        else:
            self._renewed = recoveries
            log.info("API TLS context renewed after the HSM came back")

    @property
    def stale(self) -> bool:
        """The HSM has recovered since `current` was made: until it is renewed, handshakes fail."""
        return bool(self._cfg.tls_key_label) and self._renewed != self._hsm.state.recoveries

    def close(self) -> None:
        self._closed = True
        self._hsm.remove_listener(self._on_hsm_state)


async def probe_forever(hsm: Hsm, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if hsm.state.ready:
            try:
                await hsm.aprobe(timeout=max(PROBE_INTERVAL * 4, 2.0))
            except Exception as exc:  # the pool has started recovery; /readyz shows the reason
                log.debug("HSM probe failed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), PROBE_INTERVAL)
        except TimeoutError:
            pass


class ListenError(SpyrusError, kind=Kind.CONFIG):
    """A listener cannot bind its address (in use, not assignable, not permitted)."""


async def listen(runner: web.AppRunner, host: str, port: int, ctx: ssl.SSLContext | None, setting: str) -> int:
    """Set up `runner` and serve it on host:port; the port bound (when 0 asked for one). On
    ListenError (naming `setting`) nothing is left behind."""
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ctx, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {host}:{port} ({setting}): "
                          f"{exc.strerror or exc.__class__.__name__}") from None
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else port


class Listeners:
    """The API (HTTPS) and health (HTTP, loopback) sites of one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.runners: list[web.AppRunner] = []
        self.api_port: int | None = None
        self.health_port: int | None = None
        self.server_tls: ServerTls | None = None
        self.api_listen_error: str | None = None  # why the API's port could not be bound, last time

    async def start_health(self) -> None:
        cfg = self.service.cfg
        if not cfg.health_port:
            return
        app = web.Application()
        app[SERVICE] = self.service
        app[API_NOT_SERVING] = self.api_not_serving
        app.add_routes([r for r in health.ROUTES if r.path in ("/healthz", "/readyz")])
        self.health_port = await self._start(app, cfg.health_host, cfg.health_port, None, "service.health_port")

    async def start_api(self, server_tls: ServerTls) -> None:
        cfg = self.service.cfg
        try:
            self.api_port = await self._start(build_app(self.service), cfg.host, cfg.port, server_tls.listening,
                                              "service.port")
        except ListenError as exc:
            self.api_listen_error = str(exc)
            raise
        self.server_tls = server_tls
        log.info("API listening on https://%s:%d", cfg.host, self.api_port)

    def api_not_serving(self) -> str | None:
        """Why the API cannot serve a leaf although the HSM is ready, or None when it can."""
        if self.api_port is None:
            return self.api_listen_error or "the API is not listening yet"
        if self.server_tls is not None and self.server_tls.stale:
            return "the API's TLS context is being renewed after the HSM came back"
        return None

    async def _start(self, app: web.Application, host: str, port: int, ctx: ssl.SSLContext | None,
                     setting: str) -> int:
        runner = Runner(app, access_log=None, shutdown_timeout=2.0)
        bound = await listen(runner, host, port, ctx, setting)
        self.runners.append(runner)
        return bound

    async def stop(self) -> None:
        if self.server_tls is not None:
            self.server_tls.close()
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()
