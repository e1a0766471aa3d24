"""The API's handshake admission, tried as an attacker or a crowd would: raw TCP connections that
say nothing, ClientHellos that stop half-way, hundreds of leaves connecting at once. A client
that says nothing holds no handshake slot, a stalled handshake holds one for at most
`service.tls_handshake_timeout`, and everyone else is served meanwhile."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from service_harness import HOST, ServiceHarness
from waiting import holds_for, wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm

pytestmark = pytest.mark.timeout(120)

SLOTS = 4
TIMEOUT = 3.0  # seconds (the setting); the guard below only keeps a broken server from hanging the test
GUARD = 30.0


@pytest.fixture
def svc(hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> Iterator[ServiceHarness]:
    with ServiceHarness(hsm, tmp_path, emulator_pki, tls_handshakes=SLOTS, tls_handshake_timeout=TIMEOUT,
                        rate_limit_per_second=0.0) as s:
        yield s


def client_hello_prefix(ctx: ssl.SSLContext) -> bytes:
    """The first bytes of a real ClientHello (its record header and part of the body)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()[:20]


def test_silent_and_stalled_clients_do_not_keep_a_leaf_out(svc: ServiceHarness, hsm: Hsm) -> None:
    silent = [socket.create_connection((HOST, svc.port)) for _ in range(3 * SLOTS)]
    stalled = []
    for _ in range(SLOTS):  # every slot taken by a handshake that stops after 20 bytes
        s = socket.create_connection((HOST, svc.port))
        s.sendall(client_hello_prefix(svc.client_context()))
        stalled.append(s)
    try:
        listener = svc.listeners.api_listener if svc.listeners else None
        assert listener is not None
        # the stalled ones hold the slots, the silent ones none
        wait_for(lambda: listener.in_progress >= SLOTS, GUARD, "every slot taken", every=0.01)
        holds_for(lambda: listener.in_progress == SLOTS and listener.peak == SLOTS, 0.2,
                  "never more handshakes than the slots")
        # A leaf gets a slot once a stalled handshake times out, and is served.
        status, _, _ = svc.call("GET", "/healthz")
        assert status == 200
        for s in stalled:  # closed by the server: recv returns b"" (or a reset)
            s.settimeout(GUARD)
            try:
                assert s.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in silent + stalled:
            s.close()


def test_512_leaves_connecting_at_once_are_all_served_a_few_handshakes_at_a_time(svc: ServiceHarness) -> None:
    async def crowd() -> list[int]:
        connector = aiohttp.TCPConnector(limit=512, ssl=svc.client_context(), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one() -> int:
                async with session.get(f"{svc.url}/healthz") as resp:
                    await resp.read()
                    return resp.status
            return await asyncio.gather(*(one() for _ in range(512)))

    statuses = asyncio.run(crowd())
    assert statuses == [200] * 512
    listener = svc.listeners.api_listener if svc.listeners else None
    assert listener is not None and listener.in_progress == 0
    assert listener.peak == SLOTS
