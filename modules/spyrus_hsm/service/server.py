"""Running the service: the HTTPS listener, which admits a bounded number of TLS handshakes at
a time (its credential: server_tls), the plain-HTTP loopback health listener for the
container's HEALTHCHECK, and a probe that notices an unplugged HSM even when no request is in
flight."""

from __future__ import annotations

import asyncio
import logging
import ssl

from aiohttp import web

from ..hsm import Hsm
from ..listening import ListenError, listen
from ..threads import Lane
from .admission import TlsListener
from .api_tls import ServerTls
from .app import build_app
from .appkeys import API_NOT_SERVING, SERVICE
from .core import Service
from .protocol import Runner
from .routes import health

CLOSE_DEADLINE = 5.0  # seconds for the TLS renewal thread to stop (it is told 1 s)

log = logging.getLogger(__name__)
PROBE_INTERVAL = 0.5  # seconds: /readyz turns false within about this after an unplug


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
        self.server_tls: ServerTls | None = None
        self.api_listener: TlsListener | None = None
        self.api_start_error: str | None = None  # why the API could not start, last time
        self._closing = Lane("api-stop", 1)

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
        runner = Runner(build_app(self.service), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            listener = TlsListener.bind(runner.server, cfg.host, cfg.port, server_tls.listening,
                                        handshakes=cfg.tls_handshakes, timeout=cfg.tls_handshake_timeout,
                                        per_source=cfg.tls_per_source)
        except OSError as exc:
            await runner.cleanup()
            self.api_start_error = (f"cannot listen on {cfg.host}:{cfg.port} (service.port): "
                                    f"{exc.strerror or exc.__class__.__name__}")
            raise ListenError(self.api_start_error) from None
        listener.start()
        self.api_listener, self.api_port, self.server_tls = listener, listener.port, server_tls
        self.runners.append(runner)
        self.api_start_error = None
        log.info("API listening on https://%s:%d", cfg.host, self.api_port)

    def api_not_serving(self) -> str | None:
        """Why the API cannot serve a leaf although the HSM is ready, or None when it can."""
        if self.api_port is None:
            return self.api_start_error or "the API is not listening yet"
        return self.server_tls.not_serving() if self.server_tls is not None else None

    async def _start(self, app: web.Application, host: str, port: int, ctx: ssl.SSLContext | None,
                     setting: str) -> int:
        runner = Runner(app, access_log=None, shutdown_timeout=2.0)
        bound = await listen(runner, host, port, ctx, setting)
        self.runners.append(runner)
        return bound

    async def stop(self) -> None:
        if self.api_listener is not None:
            await self.api_listener.close()
        if self.server_tls is not None:
            await self._closing.run(self.server_tls.close, CLOSE_DEADLINE, "stopping the API's TLS renewal")
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()
