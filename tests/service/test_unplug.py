"""The signing service while its HSM is unplugged and plugged back, faults from tests/p11shim.

Leaves asking for tokens get 503 problem+json with Retry-After while the HSM is gone, /readyz
turns 503 (ready: false) within 1 s of the unplug whether or not requests are in flight (the
service probes the HSM), and once the HSM is back requests succeed again with nothing
restarted, also when the server's TLS key is itself in the HSM. No answer is ever a token
signed with another device's key.

These run in the pytest process whose PKCS#11 module is the shim (marker `shim`).
"""

from __future__ import annotations

import asyncio
import http.client
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from service_harness import HOST, ServiceHarness, free_port, store_hsm_certificate, verify_sas
from waiting import await_for, wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret
from spyrus_hsm.identity import tls

pytestmark = [pytest.mark.shim, pytest.mark.timeout(90)]

NOT_READY_WITHIN = 1.0  # seconds from the unplug to /readyz answering 503: the requirement
RECOVERY_GUARD = 15.0   # only so that a service that never recovers fails instead of hanging
CLIENTS = 12
DEVICES = 6
POLICY = [{"principals": ["gateway"], "operations": ["sas-token"], "devices": ["leaf-*"]}]
PROBLEM_JSON = "application/problem+json"


@pytest.fixture
def plugged(token_env, hsm: Hsm) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    token_env.set_shim(state="plugged")
    wait_for(lambda: hsm.state.ready, RECOVERY_GUARD, "the HSM ready before the test")
    yield token_env
    token_env.set_shim(state="plugged")
    wait_for(lambda: hsm.state.ready, RECOVERY_GUARD, "the HSM ready after the test")


@pytest.fixture
def devices(hsm: Hsm, plugged: Any) -> dict[str, bytes]:
    keys = {f"leaf-{secrets.token_hex(3)}": secrets.token_bytes(32) for _ in range(DEVICES)}
    for name, key in keys.items():
        hsm.import_secret_key(name, Secret(key))
    return keys


@pytest.fixture
def bearer() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture
def service(hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, devices: dict[str, bytes],
            bearer: str) -> Iterator[ServiceHarness]:
    # Cache off and no rate limit: every request is a signature in the HSM.
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, bearer={"gateway": bearer}, probe=True,
                        cache_reuse_fraction=0.0, rate_limit_per_second=0.0) as svc:
        yield svc


async def readyz(session: aiohttp.ClientSession, svc: ServiceHarness) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{svc.url}/readyz") as resp:
        return resp.status, await resp.json(content_type=None)


async def seconds_until_not_ready(session: aiohttp.ClientSession, svc: ServiceHarness, since: float) -> float:
    """Poll /readyz (no authentication) until it answers 503 with ready: false."""
    while True:
        status, body = await readyz(session, svc)
        if status == 503:
            assert body["ready"] is False and body["status"] != "ready", body
            return time.monotonic() - since
        assert status == 200 and body["ready"] is True, (status, body)
        assert time.monotonic() - since < RECOVERY_GUARD, "/readyz never turned false"
        await asyncio.sleep(0.01)


async def until_ready(session: aiohttp.ClientSession, svc: ServiceHarness) -> None:
    end = time.monotonic() + RECOVERY_GUARD
    while (await readyz(session, svc))[0] != 200:
        assert time.monotonic() < end, f"/readyz not back to 200 within {RECOVERY_GUARD} s of the replug"
        await asyncio.sleep(0.02)


@dataclass
class Tally:
    ok: int = 0
    unavailable: int = 0
    wrong: list[str] = field(default_factory=list)       # tokens that do not verify for the device asked
    bad_503: list[str] = field(default_factory=list)     # a 503 without problem+json or Retry-After
    other: Counter[int] = field(default_factory=Counter)  # any other status


async def leaf_client(n: int, svc: ServiceHarness, bearer: str, devices: dict[str, bytes],
                      tally: Tally, stop: asyncio.Event) -> None:
    names = list(devices)
    headers = {"Authorization": f"Bearer {bearer}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=svc.client_context())) as session:
        i = n
        while not stop.is_set():
            device = names[i % len(names)]
            i += 1
            async with session.post(f"{svc.url}/v1/sas-tokens", json={"deviceId": device}, headers=headers) as resp:
                body = await resp.json(content_type=None)
                if resp.status == 200:
                    try:
                        fields = verify_sas(body["token"], devices[device])
                        assert fields["sr"] == f"hub.example/devices/{device}"
                    except AssertionError as exc:
                        tally.wrong.append(f"{device}: {exc}")
                    tally.ok += 1
                elif resp.status == 503:
                    tally.unavailable += 1
                    if resp.content_type != PROBLEM_JSON or "Retry-After" not in resp.headers:
                        tally.bad_503.append(f"{resp.content_type} {dict(resp.headers)} {body}")
                    # a leaf backs off (briefer than Retry-After, to keep the load up): pacing, not a wait
                    await asyncio.sleep(0.05)
                else:
                    tally.other[resp.status] += 1


async def until(cond: Any, what: str) -> None:
    await await_for(cond, RECOVERY_GUARD, what, every=0.01)


def test_unplug_under_load_gives_503_then_recovers_and_never_a_wrong_token(
        service: ServiceHarness, plugged: Any, devices: dict[str, bytes], bearer: str) -> None:
    tally = Tally()

    async def scenario() -> dict[str, float | int]:
        stop = asyncio.Event()
        clients = [asyncio.create_task(leaf_client(n, service, bearer, devices, tally, stop)) for n in range(CLIENTS)]
        figures: dict[str, float | int] = {}
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=service.client_context())) as probe:
                await until(lambda: tally.ok >= 50, "50 tokens before the unplug")
                unplugged_at = time.monotonic()
                plugged.set_shim(state="unplugged")
                figures["not_ready_after"] = await seconds_until_not_ready(probe, service, unplugged_at)
                ok_at_unplug = tally.ok
                await until(lambda: tally.unavailable >= 3 * CLIENTS, "503s while unplugged")
                # the HSM stays away a while under load
                await until(lambda: tally.unavailable >= 6 * CLIENTS, "more 503s while unplugged")
                figures["ok_while_unplugged"] = tally.ok - ok_at_unplug
                plugged.set_shim(state="plugged")
                replugged_at = time.monotonic()
                await until_ready(probe, service)
                figures["ready_after_replug"] = time.monotonic() - replugged_at
                ok_at_replug = tally.ok
                await until(lambda: tally.ok >= ok_at_replug + 50, "50 tokens after the replug")
        finally:
            stop.set()
            await asyncio.gather(*clients)
        return figures

    figures = asyncio.run(scenario())
    print(f"\nunplug under load: /readyz false after {figures['not_ready_after']:.3f} s, ready "
          f"{figures['ready_after_replug']:.3f} s after the replug; {tally.ok} x 200, {tally.unavailable} x 503 "
          f"({figures['ok_while_unplugged']} x 200 answered around the unplug), other {dict(tally.other)}")
    assert figures["not_ready_after"] < NOT_READY_WITHIN
    assert tally.wrong == []
    assert tally.bad_503 == []
    assert tally.other == Counter()
    assert tally.unavailable >= 3 * CLIENTS


def test_readyz_turns_false_within_1_s_of_an_unplug_with_no_requests_at_all(
        service: ServiceHarness, plugged: Any, devices: dict[str, bytes], bearer: str) -> None:
    device = next(iter(devices))

    async def scenario() -> tuple[float, aiohttp.ClientResponse, dict[str, Any]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=service.client_context())) as session:
            assert (await readyz(session, service))[0] == 200
            # idle: no request has touched the HSM for a while (this wait is the scenario)
            await asyncio.sleep(1.0)
            unplugged_at = time.monotonic()
            plugged.set_shim(state="unplugged")
            delay = await seconds_until_not_ready(session, service, unplugged_at)
            async with session.get(f"{service.url}/readyz") as resp:
                body = await resp.json(content_type=None)
            plugged.set_shim(state="plugged")
            await until_ready(session, service)
            return delay, resp, body

    delay, resp, body = asyncio.run(scenario())
    print(f"\nidle unplug: /readyz false after {delay:.3f} s")
    assert delay < NOT_READY_WITHIN
    assert resp.status == 503 and resp.content_type == PROBLEM_JSON and resp.headers["Retry-After"] == "1"
    assert body["type"].endswith("/not-ready") and body["ready"] is False
    # Back without a restart: the same service signs again.
    status, _, token = service.call("POST", "/v1/sas-tokens", {"deviceId": device}, bearer=bearer)
    assert status == 200, token
    verify_sas(token["token"], devices[device])


def key_in_hsm_service(hsm: Hsm, plugged: Any, tmp_path: Path, pki: EmulatorPki, bearer: str,
                       **overrides: Any) -> ServiceHarness:
    """The service with its TLS key in the HSM and a plain server certificate: every handshake
    signs in the HSM through pkcs11-provider (the `hsm` placement of service/server_tls)."""
    tls.load_provider(plugged.module, str(plugged.pin_file), tmp_path / "openssl")
    label = "api-" + secrets.token_hex(3)
    store_hsm_certificate(hsm, label, pki, server_ip=HOST)
    return ServiceHarness(hsm, tmp_path, pki, policy=POLICY, bearer={"gateway": bearer}, probe=True,
                          tls_key_label=label, tls_cert_file=None, tls_key_file=None, **overrides)


def test_with_the_server_key_in_the_hsm_new_leaves_are_served_again_after_a_replug(
        hsm: Hsm, plugged: Any, tmp_path: Path, emulator_pki: EmulatorPki, devices: dict[str, bytes],
        bearer: str) -> None:
    # A TLS context made before a replug can never sign again (pkcs11-provider #494).
    device = next(iter(devices))
    with key_in_hsm_service(hsm, plugged, tmp_path, emulator_pki, bearer) as svc:
        status, _, token = svc.call("POST", "/v1/sas-tokens", {"deviceId": device}, bearer=bearer)
        assert status == 200, token
        recoveries = hsm.state.recoveries
        plugged.set_shim(state="unplugged")
        wait_for(lambda: not hsm.state.ready, RECOVERY_GUARD, "noticed unplugged")
        plugged.set_shim(state="plugged")
        wait_for(lambda: hsm.state.ready and hsm.state.recoveries > recoveries, RECOVERY_GUARD, "recovered")

        def new_leaf_served() -> bool:  # each call is a new connection: a new handshake
            try:
                status, _, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": device}, bearer=bearer)
            except (OSError, http.client.HTTPException):
                return False
            assert status == 200, body
            verify_sas(body["token"], devices[device])
            return True

        wait_for(new_leaf_served, RECOVERY_GUARD, "a new leaf served after the replug")
        assert all(new_leaf_served() for _ in range(5))  # and every one after it


def test_with_the_server_key_in_the_hsm_readyz_turns_true_after_a_replug_only_once_new_leaves_are_served(
        hsm: Hsm, plugged: Any, tmp_path: Path, emulator_pki: EmulatorPki, devices: dict[str, bytes],
        bearer: str) -> None:
    """The HSM is ready again a moment before the API's TLS context is renewed: /readyz on the
    health listener (what the container's health check and an operator look at) waits for both."""
    device = next(iter(devices))
    with key_in_hsm_service(hsm, plugged, tmp_path, emulator_pki, bearer, health_port=free_port()) as svc:
        assert svc.health_port is not None
        assert health_readyz(svc.health_port) == 200
        plugged.set_shim(state="unplugged")
        wait_for(lambda: health_readyz(svc.health_port) == 503, RECOVERY_GUARD, "not ready after the unplug")
        plugged.set_shim(state="plugged")
        wait_for(lambda: health_readyz(svc.health_port) == 200, RECOVERY_GUARD, "ready after the replug")
        # At once, on a new connection (a new handshake, signed in the HSM):
        status, _, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": device}, bearer=bearer)
    assert status == 200, body
    verify_sas(body["token"], devices[device])


def test_with_the_server_key_in_the_hsm_two_recoveries_in_a_row_leave_the_api_ready(
        hsm: Hsm, plugged: Any, tmp_path: Path, emulator_pki: EmulatorPki, devices: dict[str, bytes],
        bearer: str) -> None:
    """Each recovery asks for a new TLS context. They used to be made on a thread each, so one
    made for an older recovery could finish last and leave /readyz false until the next one; one
    thread now makes them in turn, and readiness follows the newest recovery."""
    device = next(iter(devices))
    with key_in_hsm_service(hsm, plugged, tmp_path, emulator_pki, bearer, health_port=free_port()) as svc:
        assert svc.health_port is not None
        for _ in range(2):
            recoveries = hsm.state.recoveries
            plugged.set_shim(state="unplugged")
            wait_for(lambda: not hsm.state.ready, RECOVERY_GUARD, "noticed unplugged")
            plugged.set_shim(state="plugged")
            wait_for(lambda r=recoveries: hsm.state.ready and hsm.state.recoveries > r, RECOVERY_GUARD,
                       "recovered")  # no wait for the TLS context: the next unplug comes at once
        wait_for(lambda: health_readyz(svc.health_port) == 200, RECOVERY_GUARD, "ready after both")
        status, _, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": device}, bearer=bearer)
    assert status == 200, body
    verify_sas(body["token"], devices[device])


def health_readyz(port: int) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    finally:
        conn.close()
