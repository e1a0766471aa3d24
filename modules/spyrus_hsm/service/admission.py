"""The API's HTTPS listener: it accepts connections itself and admits their TLS handshakes a
bounded number at a time.

asyncio runs every server-side TLS handshake on the event loop. A burst of new connections (a
site's leaves all reconnecting after an outage, say) would otherwise run hundreds of handshakes
in the same loop iterations and hold up every request on the connections already open. So a
connection goes through three stages:

1. *pending*: accepted, it waits, holding no handshake slot and reading nothing, until the
   first TLS record of its client (the ClientHello's) has arrived whole. It looks with
   MSG_PEEK, and SO_RCVLOWAT makes the kernel wake the loop only once enough bytes are there:
   first one byte, which must be 22 (a handshake record; anything else, an HTTP request on the
   TLS port, say, is closed at once), then the 5-byte record header (protocol major version 3,
   a length of 1 to 16,384 bytes), then the whole record. A client that sends one byte, or a
   ClientHello cut short, never gets further than this stage;
2. it waits for one of `handshakes` slots;
3. with a slot it is handed to asyncio for the handshake, which must end within `timeout` s.

Stages 1 and 2 together must end within `timeout` seconds as well, or the connection is closed.
At most `pending` connections are in stages 1 and 2 (beyond those, connections wait in the
kernel's listen backlog), and at most `per_source` connections from one source address are in
stages 1 to 3: a further connection from that address is closed at once (reset), before any
byte of it is read, so one address cannot take the pending places of everyone else. The count
of an address goes down when its connection's handshake ends, however it ends. Addresses are
counted exactly (an IPv6 network is not one source): leaves behind one NAT share an address,
and `per_source` must allow for them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from typing import Any

log = logging.getLogger(__name__)
PENDING = 1024  # accepted connections whose handshake has not started
PER_SOURCE = 32  # connections of one source address not yet through their handshake
ACCEPT_PAUSE = 0.1  # seconds to wait after accept() fails (out of file descriptors, say)
# accept() that succeeds at once does not yield to the loop: with a full backlog (an address
# reconnecting as fast as it is refused) the loop gets a turn after this many
ACCEPTS_PER_TURN = 16
HANDSHAKE_RECORD = 22  # TLS ContentType handshake: a ClientHello's record
RECORD_HEADER = 5  # content type, protocol version (2 bytes), length (2 bytes)
MAX_RECORD = 16_384  # TLSPlaintext.length is at most 2^14


class _NotTls(Exception):
    """The client's first bytes are not a TLS handshake record."""


class TlsListener:
    def __init__(self, protocol_factory: Any, sock: socket.socket, ctx: ssl.SSLContext, *,
                 handshakes: int, timeout: float, per_source: int = PER_SOURCE, pending: int = PENDING) -> None:
        self._factory, self._sock, self._ctx, self._timeout = protocol_factory, sock, ctx, timeout
        self._slots = asyncio.Semaphore(handshakes)
        self._pending = asyncio.Semaphore(pending)
        self._per_source = per_source
        self._sources: dict[str, int] = {}  # address -> its connections not through their handshake
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self.in_progress = self.peak = 0  # handshakes holding a slot, now and at most (observable)
        # connections closed at once: over their address's per_source, first bytes not TLS (observable)
        self.refused = {"per-source": 0, "not-tls": 0}

    @classmethod
    def bind(cls, protocol_factory: Any, host: str, port: int, ctx: ssl.SSLContext, *, handshakes: int,
             timeout: float, per_source: int = PER_SOURCE, backlog: int = 1024) -> TlsListener:
        """Listen on host:port (OSError if it cannot)."""
        sock = socket.create_server((host, port), backlog=backlog, reuse_port=False)
        sock.setblocking(False)
        return cls(protocol_factory, sock, ctx, handshakes=handshakes, timeout=timeout, per_source=per_source)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def waiting(self, source: str) -> int:
        """Connections from `source` not yet through their handshake."""
        return self._sources.get(source, 0)

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
        accepted = 0
        while True:
            accepted += 1
            if accepted % ACCEPTS_PER_TURN == 0:
                await asyncio.sleep(0)
            await self._pending.acquire()
            try:
                conn, peer = await loop.sock_accept(self._sock)
            except OSError as exc:
                self._pending.release()
                log.warning("the API could not accept a connection: %s", exc.strerror or exc)
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            except BaseException:
                self._pending.release()
                raise
            source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            held = self._sources.get(source, 0)
            if held >= self._per_source:
                self._pending.release()
                self.refused["per-source"] += 1
                log.debug("connection from %s closed: it has %d not yet through their TLS handshake", source, held)
                _reset(conn)
                continue
            self._sources[source] = held + 1
            task = loop.create_task(self._admit(conn, source))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _admit(self, conn: socket.socket, source: str) -> None:
        loop = asyncio.get_running_loop()
        handed_over = False
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    await _first_record(loop, conn)
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
        except _NotTls as exc:
            self.refused["not-tls"] += 1
            log.debug("connection from %s closed: %s", source, exc)
        except (OSError, TimeoutError, ssl.SSLError) as exc:  # the client's problem: nothing to answer
            log.debug("TLS connection dropped before it was established: %r", exc)
        except Exception as exc:  # ours (the HTTP server's protocol, say): one line, the listener goes on
            log.warning("a TLS connection could not be set up: %s: %s", type(exc).__name__, exc)
        finally:
            left = self._sources.get(source, 1) - 1
            if left > 0:
                self._sources[source] = left
            else:
                self._sources.pop(source, None)
            if not handed_over:
                _reset(conn)


def _reset(conn: socket.socket) -> None:
    """Close at once, with a reset: no FIN exchange, no TIME_WAIT left behind on our side."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


async def _first_record(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Until the client's first TLS record has arrived whole, reading nothing (_NotTls if its
    first bytes are not a handshake record's; ConnectionError if it closes before)."""
    first = await _peek(loop, conn, 1)
    if first[0] != HANDSHAKE_RECORD:
        raise _NotTls(f"its first byte {first[0]:#04x} does not begin a TLS handshake record")
    header = await _peek(loop, conn, RECORD_HEADER)
    length = int.from_bytes(header[3:5], "big")
    if header[1] != 3 or not 0 < length <= MAX_RECORD:
        raise _NotTls(f"its first bytes {header.hex()} are not a TLS record header")
    await _peek(loop, conn, RECORD_HEADER + length)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # asyncio's transport reads from here


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket, count: int) -> bytes:
    """The first `count` bytes the client sent, left unread; waits until they are there. The
    kernel wakes the loop only once `count` bytes have arrived (SO_RCVLOWAT), or the client
    closed: then ConnectionError."""
    data = _peeked(conn, count)
    if len(data) < count:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
        await _readable(loop, conn)
        data = _peeked(conn, count)
        if len(data) < count:
            raise ConnectionError(f"the client closed the connection after {len(data)} byte(s) of its first record")
    return data


def _peeked(conn: socket.socket, count: int) -> bytes:
    try:
        return conn.recv(count, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Until `conn` is readable (SO_RCVLOWAT bytes there, or its peer closed it), reading nothing."""
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
