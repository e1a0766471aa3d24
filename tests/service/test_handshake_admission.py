"""The API's handshake admission, tried as an attacker or a crowd would: raw TCP connections that
say nothing or one byte, ClientHellos that stop half-way, bytes that are not TLS, one address
holding a thousand connections, hundreds of leaves connecting at once, a flood of bad
credentials. A connection holds a handshake slot only once its whole first TLS record has
arrived, one address holds at most `service.tls_per_source` connections before their handshake
is through, a source whose requests keep failing authentication is refused before its
credentials are looked at, and the audit log counts such refusals instead of writing each."""

from __future__ import annotations

import asyncio
import http.client
import json
import resource
import secrets
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import addresses
import aiohttp
import pytest
from service_harness import HOST, ServiceHarness, new_leaf, problem_type
from waiting import holds_for, wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm
from spyrus_hsm.service.admission import TlsListener

pytestmark = pytest.mark.timeout(180)

SLOTS = 4
TIMEOUT = 3.0  # seconds (the setting); the guard below only keeps a broken server from hanging the test
GUARD = 30.0
# For the tests where only admission can let a client through: no slot is freed by a timeout
# while the test runs (the settings' maximum is 120 s).
LONG_TIMEOUT = 110.0


@pytest.fixture
def svc(hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> Iterator[ServiceHarness]:
    # tls_per_source: the crowd below comes from one address, as if behind one NAT
    with ServiceHarness(hsm, tmp_path, emulator_pki, tls_handshakes=SLOTS, tls_handshake_timeout=TIMEOUT,
                        rate_limit_per_second=0.0, tls_per_source=1024) as s:
        yield s


@pytest.fixture
def many_files() -> Iterator[None]:
    """A soft RLIMIT_NOFILE high enough for a thousand client sockets (and the server's own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if wanted < 2500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1000 client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def listener_of(svc: ServiceHarness) -> TlsListener:
    listener = svc.listeners.api_listener if svc.listeners else None
    assert listener is not None
    return listener


def first_flight(ctx: ssl.SSLContext) -> bytes:
    """What a real TLS client sends first: its ClientHello, one whole record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = outgoing.read()
    assert data[0] == 22 and len(data) == 5 + int.from_bytes(data[3:5], "big"), data[:5].hex()
    return data


def client_hello_prefix(ctx: ssl.SSLContext) -> bytes:
    """The first bytes of a real ClientHello (its record header and part of the body)."""
    return first_flight(ctx)[:20]


def connect_from(source: str, port: int, send: bytes = b"") -> socket.socket:
    """A raw TCP connection to the API from `source` (a loopback address of this session's),
    having sent `send` (nothing if the server has already closed it)."""
    s = socket.socket()
    s.settimeout(GUARD)
    s.bind((source, 0))
    try:
        s.connect((HOST, port))
    except ConnectionError:  # refused at once, before connect() returned
        return s
    if send:
        try:
            s.sendall(send)
        except OSError:  # refused at once: reset before the bytes went
            pass
    return s


def closed_by_server(s: socket.socket) -> bool:
    """The server has closed `s` (a FIN or a reset has arrived); False while it is open."""
    s.setblocking(False)
    try:
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    finally:
        s.setblocking(True)


def wait_closed(s: socket.socket) -> None:
    """Until the server closes `s`: AssertionError if it is still open after GUARD seconds (far
    less than the handshake timeout of the tests that use this)."""
    s.settimeout(GUARD)
    try:
        while s.recv(65536):
            pass
    except ConnectionError:
        pass
    except TimeoutError:
        raise AssertionError("the server did not close the connection") from None


def https_from(svc: ServiceHarness, source: str) -> http.client.HTTPSConnection:
    """A keep-alive HTTPS connection to the API from `source`."""
    return http.client.HTTPSConnection(HOST, svc.port, context=svc.client_context(), timeout=GUARD,
                                       source_address=(source, 0))


def ask(conn: http.client.HTTPSConnection, method: str, path: str, body: Any = None,
        bearer: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    parsed = json.loads(payload) if "json" in resp.headers.get("Content-Type", "") else payload.decode()
    return resp.status, {k.lower(): v for k, v in resp.headers.items()}, parsed


def close_all(sockets: list[socket.socket]) -> None:
    for s in sockets:
        s.close()


# --- slots: taken only by a whole first record ----------------------------------------------------

def test_silent_cut_short_and_stalled_clients_do_not_keep_a_leaf_out(svc: ServiceHarness) -> None:
    listener = listener_of(svc)
    source = addresses.host()
    silent = [connect_from(source, svc.port) for _ in range(3 * SLOTS)]
    # a ClientHello that stops after 20 bytes: no slot
    cut_short = [connect_from(source, svc.port, client_hello_prefix(svc.client_context())) for _ in range(2 * SLOTS)]
    stalled = []
    try:
        wait_for(lambda: listener.waiting(source) == 5 * SLOTS, GUARD, "all of them accepted", every=0.01)
        holds_for(lambda: listener.in_progress == 0, 0.2, "no slot taken by an incomplete record")
        # every slot taken by a handshake that stops after the ClientHello
        stalled = [connect_from(source, svc.port, first_flight(svc.client_context())) for _ in range(SLOTS)]
        wait_for(lambda: listener.in_progress >= SLOTS, GUARD, "every slot taken", every=0.01)
        holds_for(lambda: listener.in_progress == SLOTS and listener.peak == SLOTS, 0.2,
                  "never more handshakes than the slots")
        # A leaf gets a slot once a stalled handshake times out, and is served.
        status, _, _ = svc.call("GET", "/healthz")
        assert status == 200
        for s in stalled + cut_short:  # closed by the server after the timeout
            wait_closed(s)
    finally:
        close_all(silent + cut_short + stalled)


def test_seventeen_one_byte_connections_do_not_keep_a_leaf_out(hsm: Hsm, tmp_path: Path,
                                                                emulator_pki: EmulatorPki) -> None:
    """Each sends the first byte of a TLS record and no more: with the default 16 slots, they
    held them all (and a leaf waited for the timeout); now they hold none."""
    source = addresses.host()
    with ServiceHarness(hsm, tmp_path, emulator_pki, tls_handshake_timeout=LONG_TIMEOUT) as svc:
        listener = listener_of(svc)
        assert svc.cfg.tls_handshakes == 16
        one_byte = [connect_from(source, svc.port, b"\x16") for _ in range(17)]
        try:
            wait_for(lambda: listener.waiting(source) == 17, GUARD, "the 17 connections accepted", every=0.01)
            status, _, _ = svc.call("GET", "/healthz")  # a real TLS client: handshake and request
            assert status == 200
            assert listener.in_progress == 0 and listener.waiting(source) == 17
            assert not any(closed_by_server(s) for s in one_byte)
        finally:
            close_all(one_byte)


# --- per source -----------------------------------------------------------------------------------

def test_connections_of_one_source_beyond_tls_per_source_are_closed_while_another_is_served(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    source = addresses.host()
    with ServiceHarness(hsm, tmp_path, emulator_pki, tls_handshake_timeout=LONG_TIMEOUT, tls_per_source=8) as svc:
        listener = listener_of(svc)
        held = [connect_from(source, svc.port) for _ in range(12)]
        try:
            wait_for(lambda: sum(closed_by_server(s) for s in held) == 4, GUARD,
                     "the 4 connections over the cap closed", every=0.01)
            assert listener.refused["per-source"] == 4 and listener.waiting(source) == 8
            # another source is served meanwhile, and the 8 stay open
            status, _, _ = svc.call("GET", "/healthz")
            assert status == 200
            open_ones = [s for s in held if not closed_by_server(s)]
            assert len(open_ones) == 8
        finally:
            close_all(held)
        # the count goes down as connections go: the source is served again
        wait_for(lambda: listener.waiting(source) == 0, GUARD, "the source's connections released", every=0.01)
        conn = https_from(svc, source)
        try:
            assert ask(conn, "GET", "/healthz")[0] == 200
        finally:
            conn.close()
        assert listener.waiting(source) == 0


@pytest.mark.parametrize("first", [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x09\x00\x00\x10",
                                   b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\xff\xff"],
                         ids=["http", "not TLS version 3", "empty record", "record too long"])
def test_a_source_that_sends_no_tls_handshake_record_is_closed_at_once(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, first: bytes) -> None:
    source = addresses.host()
    with ServiceHarness(hsm, tmp_path, emulator_pki, tls_handshake_timeout=LONG_TIMEOUT) as svc:
        listener = listener_of(svc)
        s = connect_from(source, svc.port, first)
        try:
            wait_closed(s)  # long before the handshake timeout
        finally:
            s.close()
        assert listener.refused["not-tls"] == 1
        wait_for(lambda: listener.waiting(source) == 0, GUARD, "the connection released", every=0.01)
        assert svc.call("GET", "/healthz")[0] == 200


def test_one_address_holding_1000_idle_and_stalled_connections_does_not_keep_a_leaf_out(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, many_files: None) -> None:
    attacker = addresses.host()
    leaf = new_leaf(hsm)
    policy = [{"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}]
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=policy, bearer={leaf.name: leaf.bearer},
                        tls_handshake_timeout=LONG_TIMEOUT) as svc:
        listener = listener_of(svc)
        prefix = client_hello_prefix(svc.client_context())
        held: list[socket.socket] = []
        try:
            for _ in range(500):
                held.append(connect_from(attacker, svc.port))
                held.append(connect_from(attacker, svc.port, prefix))
            wait_for(lambda: listener.refused["per-source"] == 1000 - svc.cfg.tls_per_source, GUARD,
                     "every connection over the cap closed", every=0.05)
            assert listener.waiting(attacker) == svc.cfg.tls_per_source and listener.in_progress == 0
            # a leaf from another address: handshake, authentication, a token
            status, _, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
            assert status == 200, body
            # and a crowd of leaves (connections from the leaf's address, at most tls_per_source at once)
            async def crowd() -> list[int]:
                connector = aiohttp.TCPConnector(limit=svc.cfg.tls_per_source, ssl=svc.client_context(),
                                                 force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    async def one() -> int:
                        async with session.get(f"{svc.url}/healthz") as resp:
                            await resp.read()
                            return resp.status
                    return await asyncio.gather(*(one() for _ in range(64)))
            assert asyncio.run(crowd()) == [200] * 64
            assert listener.waiting(attacker) == svc.cfg.tls_per_source
        finally:
            close_all(held)


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
    listener = listener_of(svc)
    assert listener.in_progress == 0
    assert listener.peak == SLOTS


# --- requests that fail authentication ------------------------------------------------------------

def test_a_source_sending_bad_tokens_is_refused_before_authentication_while_another_is_served(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    attacker = addresses.host()
    leaf = new_leaf(hsm)
    policy = [{"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}]
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=policy, bearer={leaf.name: leaf.bearer},
                        rate_limit_per_second=0.0, unauthenticated_per_second=0.5,
                        unauthenticated_burst=10) as svc:
        assert svc.service is not None
        authenticator = svc.service.authenticator
        looked_at = []
        real = authenticator.authenticate
        def counting(*args: Any) -> Any:
            looked_at.append(1)
            return real(*args)
        authenticator.authenticate = counting  # type: ignore[method-assign]
        conn = https_from(svc, attacker)
        try:
            answers = [ask(conn, "POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=secrets.token_urlsafe(24))
                       for _ in range(15)]
            statuses = [a[0] for a in answers]
            # the burst (refilled a little meanwhile at 0.5/s) fails authentication, then 429
            first_429 = statuses.index(429)
            assert 10 <= first_429 < 15 and set(statuses[:first_429]) == {401}, statuses
            assert set(statuses[first_429:]) == {429}, statuses
            status, headers, body = answers[-1]
            assert problem_type(headers, body) == "rate-limited" and int(headers["retry-after"]) >= 1, body
            assert len(looked_at) == first_429  # the refused ones' credentials were not looked at
            # even a good token from that source is refused, unseen, while its bucket is empty
            status, _, _ = ask(conn, "POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
            assert status == 429 and len(looked_at) == first_429
        finally:
            conn.close()
        # another source, with a good token, is served
        status, _, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
        assert status == 200, body


def test_a_flood_of_refused_requests_is_counted_in_a_few_audit_records(hsm: Hsm, tmp_path: Path,
                                                                       emulator_pki: EmulatorPki) -> None:
    attacker = addresses.host()
    leaf = new_leaf(hsm)
    refused = 300
    policy = [{"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}]
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=policy, bearer={leaf.name: leaf.bearer},
                        rate_limit_per_second=0.0) as svc:
        conn = https_from(svc, attacker)
        try:
            statuses = [ask(conn, "POST", "/v1/sas-tokens", {"deviceId": leaf.name},
                            bearer="not-" + secrets.token_hex(8))[0] for _ in range(refused)]
        finally:
            conn.close()
        assert set(statuses) == {401, 429} and statuses.count(401) >= svc.cfg.unauthenticated_burst
        # an authenticated leaf's requests are recorded one by one, as always
        for _ in range(10):
            assert svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)[0] == 200
        audit_file = svc.audit_file
    # closing the service writes the counts of the interval in progress
    records = [json.loads(line) for line in audit_file.read_text().splitlines()]
    theirs = [r for r in records if r["remote"] == attacker]
    assert len(theirs) <= 10, theirs  # 5 whole records, then one count per kind of refusal
    assert sum(r.get("count", 1) for r in theirs) == refused
    for outcome, status in (("unauthenticated", 401), ("rate-limited", 429)):
        assert sum(r.get("count", 1) for r in theirs if r["outcome"] == outcome) == statuses.count(status)
    counted = [r for r in theirs if "count" in r]
    assert counted and all(r["requestId"] is None and r["principal"] is None and r["since"] for r in counted)
    leaf_records = [r for r in records if r["principal"] == leaf.name]
    assert len(leaf_records) == 10 and all("count" not in r and r["outcome"] == "allowed" for r in leaf_records)
