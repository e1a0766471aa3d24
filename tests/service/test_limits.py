"""What the service refuses and when it sheds load, over real HTTPS: bodies it will not read, fields
it does not know, lifetimes out of bounds, callers over their rate, an HSM with a full queue and
requests that outlast the request timeout. Every refusal is a problem+json answer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from service_harness import Leaf, ServiceHarness, new_leaf, problem_type, verify_sas

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, HsmBusy, PoolSettings, Secret, SignAlgorithm, TokenSelector

OWN_DEVICE = {"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}
OWN_KEY = {"principals": ["*"], "operations": ["signature"], "keys": ["sign-{cn}"]}
MAX_BODY = 16384
MIN_TTL, MAX_TTL = 300, 3600


@dataclass
class Strict:
    svc: ServiceHarness
    leaf: Leaf


@pytest.fixture(scope="module")
def strict(hsm: Hsm, emulator_pki: EmulatorPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Strict]:
    """A service with narrow token lifetimes, and a leaf it serves."""
    leaf = new_leaf(hsm)
    for namespace in ("sas", "sign"):  # the device's SAS key, and an HMAC key declared for signing
        hsm.import_secret_key(f"{namespace}-{leaf.name}", Secret(leaf.key))
    with ServiceHarness(hsm, tmp_path_factory.mktemp("limits"), emulator_pki, policy=[OWN_DEVICE, OWN_KEY],
                        bearer={leaf.name: leaf.bearer}, max_body_bytes=MAX_BODY, min_ttl=MIN_TTL,
                        max_ttl=MAX_TTL, sas_key="sas-{deviceId}", dps_key="dps-{registrationId}",
                        signing_keys=("sign-*",)) as svc:
        yield Strict(svc, leaf)


# --- request bodies ----------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413(strict: Strict) -> None:
    raw = b'{"deviceId": "' + b"x" * MAX_BODY + b'"}'
    status, headers, body = strict.svc.call("POST", "/v1/sas-tokens", raw=raw, bearer=strict.leaf.bearer,
                                            headers={"Content-Type": "application/json"})
    assert status == 413 and problem_type(headers, body) == "payload-too-large"
    assert str(MAX_BODY) in body["detail"]


def test_a_body_that_is_not_json_by_content_type_is_415(strict: Strict) -> None:
    status, headers, body = strict.svc.call("POST", "/v1/sas-tokens", raw=b"deviceId=leaf", bearer=strict.leaf.bearer,
                                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and problem_type(headers, body) == "unsupported-media-type"


def test_a_body_that_is_not_valid_json_is_400(strict: Strict) -> None:
    status, headers, body = strict.svc.call("POST", "/v1/sas-tokens", raw=b'{"deviceId": ', bearer=strict.leaf.bearer,
                                            headers={"Content-Type": "application/json"})
    assert status == 400 and problem_type(headers, body) == "invalid-request"
    assert "not valid JSON" in body["detail"]


def test_an_unknown_field_is_400_naming_it(strict: Strict) -> None:
    status, headers, body = strict.svc.call("POST", "/v1/sas-tokens", {"deviceId": strict.leaf.name, "colour": "red"},
                                            bearer=strict.leaf.bearer)
    assert status == 400 and problem_type(headers, body) == "invalid-request"
    assert "unknown field(s): colour" in body["detail"]


def test_null_is_not_taken_for_an_absent_optional_field(strict: Strict) -> None:
    status, headers, body = strict.svc.call("POST", "/v1/sas-tokens", {"deviceId": strict.leaf.name, "moduleId": None},
                                            bearer=strict.leaf.bearer)
    assert status == 400 and problem_type(headers, body) == "invalid-request"
    assert "'moduleId' must be a string" in body["detail"]


def test_a_method_a_resource_does_not_have_is_405_listing_those_it_has(strict: Strict) -> None:
    status, headers, body = strict.svc.call("DELETE", "/v1/sas-tokens", bearer=strict.leaf.bearer)
    assert status == 405 and problem_type(headers, body) == "method-not-allowed"
    assert headers["allow"] == "POST"


@pytest.mark.parametrize("data, fragment", [
    ("aGVsbG8", "padded base64"),              # "hello" without its padding
    ("aGVs bG8=", "padded base64"),
    ("-_-_", "padded base64"),                 # the URL-safe alphabet
    (base64.b64encode(bytes(8193)).decode(), "at most 8192 bytes"),
], ids=["unpadded", "whitespace", "url-safe alphabet", "8193 bytes"])
def test_signature_data_must_be_padded_base64_of_at_most_8_kib(strict: Strict, data: str, fragment: str) -> None:
    request = {"key": f"sign-{strict.leaf.name}", "algorithm": "HMAC-SHA256", "data": data}
    status, headers, body = strict.svc.call("POST", "/v1/signatures", request, bearer=strict.leaf.bearer)
    assert status == 400 and problem_type(headers, body) == "invalid-request"
    assert fragment in body["detail"]


@pytest.mark.parametrize("size", [0, 1, 2, 8191, 8192])
def test_signature_data_up_to_8_kib_is_signed(strict: Strict, size: int) -> None:
    data = bytes(range(256)) * 32
    request = {"key": f"sign-{strict.leaf.name}", "algorithm": "HMAC-SHA256",
               "data": base64.b64encode(data[:size]).decode()}
    status, _, body = strict.svc.call("POST", "/v1/signatures", request, bearer=strict.leaf.bearer)
    assert status == 200, body
    assert base64.b64decode(body["signature"]) == hmac.new(strict.leaf.key, data[:size], hashlib.sha256).digest()


@pytest.mark.parametrize("ttl", [MIN_TTL - 1, MAX_TTL + 1, 0, -5], ids=["below min_ttl", "above max_ttl", "zero",
                                                                       "negative"])
def test_a_ttl_outside_the_configured_bounds_is_400(strict: Strict, ttl: int) -> None:
    status, headers, body = strict.svc.call("POST", "/v1/sas-tokens", {"deviceId": strict.leaf.name, "ttlSeconds": ttl},
                                            bearer=strict.leaf.bearer)
    assert status == 400 and problem_type(headers, body) == "invalid-request"
    assert f"'ttlSeconds' must be an integer from {MIN_TTL} to {MAX_TTL}" in body["detail"]


@pytest.mark.parametrize("ttl", [MIN_TTL, MAX_TTL, float(MAX_TTL)], ids=["min_ttl", "max_ttl", "max_ttl as 3600.0"])
def test_a_ttl_on_the_bounds_is_accepted(strict: Strict, ttl: float) -> None:
    status, _, body = strict.svc.call("POST", "/v1/sas-tokens", {"deviceId": strict.leaf.name, "ttlSeconds": ttl},
                                      bearer=strict.leaf.bearer)
    assert status == 200, body
    verify_sas(body["token"], strict.leaf.key)


# --- rate limit --------------------------------------------------------------------------------


def test_a_principal_over_its_rate_gets_429_and_others_are_unaffected(hsm: Hsm, tmp_path: Path,
                                                                       emulator_pki: EmulatorPki) -> None:
    busy, quiet = new_leaf(hsm), new_leaf(hsm)
    # 0.01/s refills one request per 100 s: nothing refills during the test, however slow the machine.
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE],
                        bearer={busy.name: busy.bearer, quiet.name: quiet.bearer},
                        rate_limit_per_second=0.01, rate_limit_burst=2) as svc:
        burst = [svc.call("POST", "/v1/sas-tokens", {"deviceId": busy.name}, bearer=busy.bearer)[0]
                 for _ in range(2)]
        status, headers, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": busy.name}, bearer=busy.bearer)
        other = svc.call("POST", "/v1/sas-tokens", {"deviceId": quiet.name}, bearer=quiet.bearer)[0]
    assert burst == [200, 200]
    assert status == 429 and problem_type(headers, body) == "rate-limited"
    assert int(headers["retry-after"]) >= 1
    assert other == 200


# --- an HSM that cannot keep up ----------------------------------------------------------------


@pytest.fixture
def one_worker_hsm(hsm: Hsm, token_env: Any) -> Iterator[Callable[[int], Hsm]]:  # TokenEnv (shadowed conftest)
    """A second pool on the session's token with one worker and a queue of `queue_limit`.

    A second pool in the process is fine: python-pkcs11 loads the module once (hsm/library.py
    keeps one library object per path), the login is the token's and is already there, and
    closing a pool neither logs out nor finalises. Depends on `hsm` so that pool logs in first.
    """
    pools: list[Hsm] = []

    def make(queue_limit: int) -> Hsm:
        settings = PoolSettings(token_env.module, TokenSelector(token_env.label), workers=1,
                                queue_limit=queue_limit, call_timeout=5)
        pools.append(Hsm(settings, Secret(token_env.pin)).start(wait=True))
        return pools[-1]

    yield make
    for pool in pools:
        pool.close()


@contextmanager
def occupied(hsm: Hsm) -> Iterator[None]:
    """The pool's one worker is busy with a call that returns only when the block ends (a slow
    token): everything submitted meanwhile waits in the queue behind it."""
    release = threading.Event()
    call = hsm.pool.submit(lambda _session: release.wait(30), "a slow HSM call")
    try:
        yield
    finally:
        release.set()
        call.result(30)


def test_a_full_hsm_queue_is_503_with_retry_after(one_worker_hsm: Callable[[int], Hsm], hsm: Hsm, tmp_path: Path,
                                                  emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    small = one_worker_hsm(1)
    with ServiceHarness(small, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        retry_after=7) as svc:
        with occupied(small):  # the slow call fills the one-place queue
            status, headers, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
    assert status == 503 and problem_type(headers, body) == "hsm-busy"
    assert headers["retry-after"] == "7"
    assert "token" not in body


def test_a_full_queue_tells_async_callers_how_long_the_queued_work_takes(
        one_worker_hsm: Callable[[int], Hsm], hsm: Hsm) -> None:
    leaf = new_leaf(hsm)
    small = one_worker_hsm(1)
    with occupied(small), pytest.raises(HsmBusy) as refused:
        asyncio.run(small.asign(leaf.name, SignAlgorithm.HMAC_SHA256, b"data"))
    assert refused.value.drain_seconds is not None and refused.value.drain_seconds > 0


def test_a_request_that_outlasts_the_request_timeout_is_503(one_worker_hsm: Callable[[int], Hsm], hsm: Hsm,
                                                           tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    slow = one_worker_hsm(8)
    with ServiceHarness(slow, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        request_timeout=0.2) as svc:
        with occupied(slow):  # the signature waits behind the slow call until the block ends
            status, headers, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
        # The signature the timed-out request started still completes, for the next caller.
        after, _, token = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
    assert status == 503 and problem_type(headers, body) == "request-timeout"
    assert "0.2 s" in body["detail"] and int(headers["retry-after"]) >= 1
    assert after == 200
    verify_sas(token["token"], leaf.key)
