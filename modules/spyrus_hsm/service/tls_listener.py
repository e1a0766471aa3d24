"""The API's HTTPS listener: it accepts connections itself and admits their TLS handshakes a
bounded number at a time.

asyncio runs every server-side TLS handshake on the event loop. A burst of new connections (a
site's leaves all reconnecting after an outage, say) would otherwise run hundreds of handshakes
in the same loop iterations and hold up every request on the connections already open. Here an
accepted connection first waits, holding no handshake slot, until its client has sent something
(its ClientHello); then for one of `handshakes` slots; its handshake must be done within
`timeout` seconds. A client that connects and says nothing holds no slot, only one of the
`pending` places (beyond those, connections wait in the kernel's backlog), and is closed after
`timeout` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

log = logging.getLogger(__name__)
PENDING = 1024  # accepted connections whose handshake has not started
ACCEPT_PAUSE = 0.1  # seconds to wait after accept() fails (out of file descriptors, say)


class TlsListener:
    def __init__(self, protocol_factory: Any, sock: socket.socket, ctx: ssl.SSLContext, *,
                 handshakes: int, timeout: float, pending: int = PENDING) -> None:
        self._factory, self._sock, self._ctx, self._timeout = protocol_factory, sock, ctx, timeout
        self._slots = asyncio.Semaphore(handshakes)
        self._pending = asyncio.Semaphore(pending)
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self.in_progress = self.peak = 0  # handshakes holding a slot, now and at most (observable)

    @classmethod
    def bind(cls, protocol_factory: Any, host: str, port: int, ctx: ssl.SSLContext, *, handshakes: int,
             timeout: float, backlog: int = 1024) -> TlsListener:
        """Listen on host:port (OSError if it cannot)."""
        sock = socket.create_server((host, port), backlog=backlog, reuse_port=False)
        sock.setblocking(False)
        return cls(protocol_factory, sock, ctx, handshakes=handshakes, timeout=timeout)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> None:
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def close(self) -> None:
        """Stop accepting and drop the connections still handshaking (open ones are the HTTP
        server's to close)."""
        tasks = [t for t in (self._accepting, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sock.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._pending.acquire()
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                self._pending.release()
                log.warning("the API could not accept a connection: %s", exc.strerror or exc)
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            except BaseException:
                self._pending.release()
                raise
            task = loop.create_task(self._admit(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _admit(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        handed_over = False
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    await _readable(loop, conn)
                    await self._slots.acquire()
            finally:
                self._pending.release()
            self.in_progress += 1
            self.peak = max(self.peak, self.in_progress)
            try:
                await loop.connect_accepted_socket(self._factory, conn, ssl=self._ctx,
                                                   ssl_handshake_timeout=self._timeout)
                handed_over = True
            finally:
                self.in_progress -= 1
                self._slots.release()
        except (OSError, TimeoutError, ssl.SSLError) as exc:  # the client's problem: nothing to answer
            log.debug("TLS connection dropped before it was established: %r", exc)
        except Exception as exc:  # ours (the HTTP server's protocol, say): one line, the listener goes on
            log.warning("a TLS connection could not be set up: %s: %s", type(exc).__name__, exc)
        finally:
            if not handed_over:
                conn.close()


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Until `conn` has data (or its peer closed it), reading nothing."""
    ready = loop.create_future()
    fd = conn.fileno()
    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
