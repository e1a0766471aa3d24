"""Running the service: the HTTPS listener (server key in a file or in the HSM through
pkcs11-provider), the plain-HTTP loopback health listener for the container's HEALTHCHECK,
and a probe that notices an unplugged HSM even when no request is in flight."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from ..config import ServiceConfig
from ..files import write_atomic
from ..hsm import Hsm
from ..identity import tls
from .app import build_app
from .core import Service
from .keys import SERVICE
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
            write_atomic(cert_file, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    else:
        assert cfg.tls_cert_file and cfg.tls_key_file
        cert_file, key_file = Path(cfg.tls_cert_file), Path(cfg.tls_key_file)
    ctx = tls.server_context(cert_file, key_file)
    if cfg.client_ca_file and not tls.defer_client_verification(ctx):
        log.warning("client certificates are verified in the TLS handshake (a bad one gets a TLS alert, not a 401)")
        ctx.load_verify_locations(cfg.client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


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


class Listeners:
    """The API (HTTPS) and health (HTTP, loopback) sites of one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.runners: list[web.AppRunner] = []
        self.api_port: int | None = None
        self.health_port: int | None = None

    async def start_health(self) -> None:
        cfg = self.service.cfg
        if not cfg.health_port:
            return
        app = web.Application()
        app[SERVICE] = self.service
        app.add_routes([r for r in health.ROUTES if r.path in ("/healthz", "/readyz")])
        self.health_port = await self._start(app, cfg.health_host, cfg.health_port, None)

    async def start_api(self, ctx: ssl.SSLContext) -> None:
        cfg = self.service.cfg
        self.api_port = await self._start(build_app(self.service), cfg.host, cfg.port, ctx)
        log.info("API listening on https://%s:%d", cfg.host, self.api_port)

    async def _start(self, app: web.Application, host: str, port: int, ctx: ssl.SSLContext | None) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ctx, backlog=1024)
        await site.start()
        self.runners.append(runner)
        server = site._server  # the bound port, when 0 asked for one
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()
