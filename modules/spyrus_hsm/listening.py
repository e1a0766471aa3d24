"""Serving an aiohttp app on a TCP address, for every listener the module opens (the API, the
health and metrics endpoints): a failure to bind is one clear configuration error naming the
setting, and leaves nothing behind."""

from __future__ import annotations

import ssl

from aiohttp import web

from .errors import Kind, SpyrusError


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
