"""The token cache against the real HSM (single-flight, separate entries) and the audit log's
fail-closed rule. Reuse over time is in tests/unit/test_token_cache.py (injected clock).

Signatures are counted where they happen: `Hsm.instrument` wraps every HSM operation and the
wrapper runs on the pool's worker thread around the PKCS#11 call itself, so wrapping the
harness's instrument counts the C_Sign calls made — not what the service reports about them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from service_harness import ServiceHarness, new_leaf, problem_type, verify_sas
from waiting import wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm

CONCURRENT = 50
OWN_DEVICE = {"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}


class HsmSignatures:
    """Counts the HSM's sign operations and, until `release` is set, holds each one back before
    it reaches the token (a slow token)."""

    def __init__(self, hsm: Hsm, held: bool = False) -> None:
        self.count = 0
        self.release = threading.Event()
        if not held:
            self.release.set()
        self._lock = threading.Lock()
        self._inner = hsm.instrument(self._wrap)

    def _wrap(self, fn: Callable[[Any], Any], operation: str, key: str | None,
              mechanism: str | None) -> Callable[[Any], Any]:
        inner = self._inner(fn, operation, key, mechanism) if self._inner else fn
        if operation != "sign":
            return inner

        def counted(session: Any) -> Any:
            self.release.wait(30)
            with self._lock:
                self.count += 1
            return inner(session)
        return counted


async def _concurrently(svc: ServiceHarness, n: int, body: dict[str, Any], bearer: str) -> list[tuple[int, Any]]:
    connector = aiohttp.TCPConnector(ssl=svc.client_context(), limit=n)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> tuple[int, Any]:
            async with session.post(f"{svc.url}/v1/sas-tokens", json=body,
                                    headers={"Authorization": f"Bearer {bearer}"}) as response:
                return response.status, await response.json(content_type=None)
        return await asyncio.gather(*(one() for _ in range(n)))


def test_concurrent_identical_requests_cause_one_hsm_signature(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    # No reuse (cache_reuse_fraction 0) and the first signature held until every request is
    # waiting: only single-flight can make them share it.
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        tls_per_source=CONCURRENT,  # every request from this one address
                        cache_reuse_fraction=0.0, rate_limit_per_second=0) as svc:
        signatures = HsmSignatures(hsm, held=True)
        with ThreadPoolExecutor(1) as client:
            answers = client.submit(asyncio.run, _concurrently(svc, CONCURRENT, {"deviceId": leaf.name}, leaf.bearer))
            try:
                assert svc.service is not None
                cache = svc.service.cache
                wait_for(lambda: cache.waiting == CONCURRENT, 60, "every request waiting at the cache", every=0.01)
            finally:
                signatures.release.set()
            results = answers.result(60)
    assert signatures.count == 1
    assert [status for status, _ in results] == [200] * CONCURRENT
    tokens = {body["token"] for _, body in results}
    assert len(tokens) == 1
    verify_sas(tokens.pop(), leaf.key)


def test_different_ttls_and_devices_are_separate_cache_entries(hsm: Hsm, tmp_path: Path,
                                                               emulator_pki: EmulatorPki) -> None:
    a, b = new_leaf(hsm), new_leaf(hsm)
    gateway = new_leaf(hsm, "gateway")
    policy = [{"principals": [gateway.name], "operations": ["sas-token"], "devices": [a.name, b.name]}]
    requests = [{"deviceId": a.name, "ttlSeconds": 600}, {"deviceId": a.name, "ttlSeconds": 900},
                {"deviceId": b.name, "ttlSeconds": 600}]
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=policy, bearer={gateway.name: gateway.bearer}) as svc:
        signatures = HsmSignatures(hsm)
        first = [svc.call("POST", "/v1/sas-tokens", r, bearer=gateway.bearer)[2]["token"] for r in requests]
        again = [svc.call("POST", "/v1/sas-tokens", r, bearer=gateway.bearer)[2]["token"] for r in requests]
    assert signatures.count == 3
    assert len(set(first)) == 3
    assert again == first
    for token, leaf in zip(first, (a, a, b), strict=True):
        verify_sas(token, leaf.key)


# --- audit fail-closed -------------------------------------------------------------------------


def _unwritable_audit_file(tmp_path: Path) -> Path:
    """A path whose parent is a regular file: open() fails for every user, root included."""
    parent = tmp_path / "not-a-directory"
    parent.write_text("")
    return parent / "audit.log"


def test_a_token_is_withheld_when_its_audit_record_cannot_be_written(hsm: Hsm, tmp_path: Path,
                                                                     emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        audit_file=_unwritable_audit_file(tmp_path), retry_after=3) as svc:
        status, headers, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
    assert status == 503 and problem_type(headers, body) == "audit-unavailable"
    assert headers["retry-after"] == "3"
    assert "token" not in body and "SharedAccessSignature" not in str(body)


def test_without_fail_closed_a_token_is_handed_out_though_the_audit_log_fails(hsm: Hsm, tmp_path: Path,
                                                                               emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        audit_file=_unwritable_audit_file(tmp_path), audit_fail_closed=False) as svc:
        status, _, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
    assert status == 200, body
    verify_sas(body["token"], leaf.key)


# --- refresh-ahead -----------------------------------------------------------------------------


def test_past_the_reuse_point_a_token_is_answered_at_once_and_its_successor_signed_in_the_background(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    other = new_leaf(hsm)
    policy = [{"principals": [leaf.name], "operations": ["sas-token"], "devices": [leaf.name, other.name]}]
    ttl, reuse = 60, 0.01  # the reuse point comes after 0.6 s; 15 s of life is the default minimum
    body = {"deviceId": leaf.name, "ttlSeconds": ttl}
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=policy, bearer={leaf.name: leaf.bearer}, min_ttl=60,
                        cache_reuse_fraction=reuse, rate_limit_per_second=0) as svc:
        first = svc.call("POST", "/v1/sas-tokens", body, bearer=leaf.bearer)[2]
        # past the reuse point, and a second later than the first signature: HMAC is
        # deterministic, so a successor with the same expiry would be the very same token
        wait_for(lambda: time.time() >= first["expiresOn"] - ttl + 1.5, 60, "1.5 s into the token's life", every=0.01)
        signatures = HsmSignatures(hsm, held=True)  # from here the HSM signs nothing until released
        with ThreadPoolExecutor(1) as client:
            waiting = client.submit(svc.call, "POST", "/v1/sas-tokens", {"deviceId": other.name},
                                    bearer=leaf.bearer)  # a miss, stuck in the HSM
            try:
                status, _, hit = svc.call("POST", "/v1/sas-tokens", body, bearer=leaf.bearer)
                assert status == 200 and hit["token"] == first["token"]  # at once, not after the HSM
            finally:
                signatures.release.set()
            assert waiting.result(30)[0] == 200
        # the miss and the background refresh; the successor is served once it is in the cache (the
        # count moves when the HSM has signed, a moment before the loop stores the token)
        wait_for(lambda: signatures.count == 2, 60, "two signatures", every=0.01)
        after = wait_for(lambda: (a := svc.call("POST", "/v1/sas-tokens", body, bearer=leaf.bearer)[2])["expiresOn"]
                         > first["expiresOn"] and a, 10, "the successor served from the cache", every=0.01)
    assert after["expiresOn"] > first["expiresOn"]
    verify_sas(after["token"], leaf.key)
    assert signatures.count == 2


def test_a_caller_that_needs_more_life_than_the_cached_token_has_gets_a_new_one(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        rate_limit_per_second=0) as svc:
        signatures = HsmSignatures(hsm)
        first = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name, "ttlSeconds": 600}, bearer=leaf.bearer)[2]
        same = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name, "ttlSeconds": 600,
                                                   "minRemainingSeconds": 500}, bearer=leaf.bearer)[2]
        fresh = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name, "ttlSeconds": 600,
                                                    "minRemainingSeconds": 600}, bearer=leaf.bearer)[2]
        status, headers, bad = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name,
                                                                   "minRemainingSeconds": 0}, bearer=leaf.bearer)
    assert same["token"] == first["token"]
    assert fresh["expiresOn"] - time.time() >= 599
    assert signatures.count == 2  # the second request was served from the cache, the third signed
    assert status == 400 and problem_type(headers, bad) == "invalid-request" and "minRemainingSeconds" in bad["detail"]
