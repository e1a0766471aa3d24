"""Unplug, replug and slow-USB behaviour, with faults injected by tests/p11shim.

These run in the pytest process whose PKCS#11 module is the shim (`make test` runs it; marker
`shim`). The shim answers CKR_DEVICE_REMOVED / CKR_TOKEN_NOT_PRESENT while "unplugged", drops
all sessions and the login on "replug", and sleeps before signing when told to.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterator

import pytest
from waiting import await_for, wait_for

from spyrus_hsm.hsm import Hsm, HsmTimeout, HsmUnavailable, PoolSettings, Secret, SignAlgorithm, TokenSelector

pytestmark = [pytest.mark.shim, pytest.mark.timeout(60)]
HMAC = SignAlgorithm.HMAC_SHA256


@pytest.fixture
def plugged(token_env):  # type: ignore[no-untyped-def]
    token_env.set_shim(state="plugged")
    yield token_env
    token_env.set_shim(state="plugged")


def _hsm(token_env, timeout: float = 5.0, wait: bool = True) -> Hsm:  # type: ignore[no-untyped-def]
    settings = PoolSettings(token_env.module, TokenSelector(token_env.label), workers=4, call_timeout=timeout,
                            retry_min=0.05, retry_max=0.25)
    return Hsm(settings, Secret(token_env.pin)).start(wait=wait)


@pytest.fixture
def keyed(plugged, label: str) -> Iterator[tuple[Hsm, str, bytes]]:  # type: ignore[no-untyped-def]
    h = _hsm(plugged)
    key = secrets.token_bytes(32)
    h.import_secret_key(label, Secret(key))
    yield h, label, key
    h.close()


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def test_unplug_fails_fast_with_the_reason_and_replug_recovers(keyed, plugged) -> None:  # type: ignore[no-untyped-def]
    h, label, key = keyed
    assert h.hmac_sha256(label, b"before") == _mac(key, b"before")
    plugged.set_shim(state="unplugged")
    with pytest.raises(HsmUnavailable) as first:
        h.hmac_sha256(label, b"during")
    assert "removed" in str(first.value) or "not present" in str(first.value) or "not ready" in str(first.value)
    wait_for(lambda: h.state.status == "degraded", 1.0, "degraded")
    assert h.state.reason
    with pytest.raises(HsmUnavailable, match="not ready"):  # refused at once while degraded
        h.hmac_sha256(label, b"still during")
    plugged.set_shim(state="plugged")
    wait_for(lambda: h.state.ready, 5.0, "ready again after replug")
    assert h.hmac_sha256(label, b"after") == _mac(key, b"after")
    assert h.state.recoveries == 1


def test_unplug_under_concurrent_load_never_returns_a_wrong_signature(keyed, plugged) -> None:  # type: ignore[no-untyped-def]
    h, label, key = keyed
    stop = threading.Event()
    outcomes = {"ok": 0, "unavailable": 0, "wrong": 0, "other": []}
    lock = threading.Lock()

    def signer(n: int) -> None:
        i = 0
        while not stop.is_set():
            data = f"{n}:{i}".encode()
            i += 1
            try:
                good = h.hmac_sha256(label, data) == _mac(key, data)
                with lock:
                    outcomes["ok" if good else "wrong"] += 1  # type: ignore[operator]
            except HsmUnavailable:
                with lock:
                    outcomes["unavailable"] += 1  # type: ignore[operator]
                time.sleep(0.01)  # pacing of the load, not a wait
            except Exception as exc:
                with lock:
                    outcomes["other"].append(repr(exc))  # type: ignore[union-attr]

    threads = [threading.Thread(target=signer, args=(n,), daemon=True) for n in range(16)]
    for t in threads:
        t.start()
    def count(kind: str) -> int:
        with lock:
            return outcomes[kind]  # type: ignore[return-value]

    try:
        wait_for(lambda: count("ok") >= 50, 10.0, "signatures made before the unplug")
        plugged.set_shim(state="unplugged")
        wait_for(lambda: h.state.status == "degraded", 2.0, "degraded")
        unavailable = count("unavailable")
        wait_for(lambda: count("unavailable") >= unavailable + 16, 5.0, "callers refused while unplugged")
        plugged.set_shim(state="plugged")
        wait_for(lambda: h.state.ready, 5.0, "ready again")
        ok_before = count("ok")
        wait_for(lambda: count("ok") >= ok_before + 50, 10.0, "signatures made after the replug")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert outcomes["wrong"] == 0 and outcomes["other"] == [], outcomes
    assert outcomes["unavailable"] > 0 and outcomes["ok"] > ok_before  # type: ignore[operator]


def test_async_callers_see_unavailable_then_success(keyed, plugged) -> None:  # type: ignore[no-untyped-def]
    h, label, key = keyed

    async def scenario() -> None:
        assert await h.asign(label, HMAC, b"a") == _mac(key, b"a")
        plugged.set_shim(state="unplugged")
        results = await asyncio.gather(*[h.asign(label, HMAC, b"b") for _ in range(16)], return_exceptions=True)
        assert all(isinstance(r, HsmUnavailable) for r in results), results
        plugged.set_shim(state="plugged")
        await await_for(lambda: h.state.ready, 5.0, "ready again after replug")
        assert await h.asign(label, HMAC, b"c") == _mac(key, b"c")

    asyncio.run(scenario())


def test_token_absent_at_start_keeps_trying_and_comes_up(plugged, label: str) -> None:  # type: ignore[no-untyped-def]
    plugged.set_shim(state="unplugged")
    h = _hsm(plugged, wait=False)
    try:
        wait_for(lambda: h.state.status == "degraded", 2.0, "degraded")
        assert "not found" in (h.state.reason or "")
        with pytest.raises(HsmUnavailable):
            h.hmac_sha256(label, b"x")
        plugged.set_shim(state="plugged")
        wait_for(lambda: h.state.ready, 5.0, "ready once plugged")
        assert h.state.token_label == plugged.label
    finally:
        h.close()


def test_wrong_pin_is_not_retried_until_the_pin_file_changes(plugged, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from spyrus_hsm.hsm import read_secret_file
    from spyrus_hsm.hsm.provision import list_tokens

    plugged.set_shim(state="unplugged")  # a replug drops this process's existing login,
    assert list_tokens(plugged.module) == []  # (the shim acts on the next call)
    plugged.set_shim(state="plugged")    # as a fresh process would start logged out
    pin_file = tmp_path / "pin"
    pin_file.write_text("wrong-pin-000\n")
    pin_file.chmod(0o600)
    settings = PoolSettings(plugged.module, TokenSelector(plugged.label), retry_min=0.05, retry_max=0.1)
    h = Hsm(settings, lambda: read_secret_file(pin_file)).start(wait=False)
    try:
        wait_for(lambda: "not retried" in (h.state.reason or ""), 2.0, "waiting for a new PIN")
        assert h.state.status == "degraded" and "wrong-pin-000" not in (h.state.reason or "")
        pin_file.write_text(plugged.pin.decode() + "\n")  # the operator fixes the PIN file
        wait_for(lambda: h.state.ready, 3.0, "ready once the PIN file is right")
    finally:
        h.close()


def test_a_slow_token_times_out_sync_and_async_calls(plugged, label: str) -> None:  # type: ignore[no-untyped-def]
    h = _hsm(plugged, timeout=0.3)
    try:
        h.import_secret_key(label, Secret(secrets.token_bytes(32)))
        plugged.set_shim(state="plugged", sign_delay_ms=1500)
        with pytest.raises(HsmTimeout, match=r"did not answer within 0\.3 s"):
            h.hmac_sha256(label, b"slow")

        async def scenario() -> int:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                for _ in range(20):
                    await asyncio.sleep(0.01)
                    ticks += 1

            t = asyncio.create_task(ticker())
            with pytest.raises(HsmTimeout):
                await h.asign(label, HMAC, b"slow")
            await t
            return ticks

        assert asyncio.run(scenario()) == 20  # the loop kept running while the HSM was slow
    finally:
        plugged.set_shim(state="plugged")
        # the abandoned slow calls finish before the next test (the pool's own busy count)
        wait_for(lambda: h.pool._busy == 0, 5.0, "the abandoned slow calls finished")
        h.close()


def test_a_state_listener_may_call_the_hsm(plugged, label: str) -> None:  # type: ignore[no-untyped-def]
    """Listeners run outside the pool's lock: one that signs on every state change neither
    deadlocks the worker that saw the unplug nor the supervisor that saw the replug."""
    h = _hsm(plugged)
    key = secrets.token_bytes(32)
    h.import_secret_key(label, Secret(key))
    seen: list[tuple[str, bytes | str]] = []

    def sign_on_change(state) -> None:  # type: ignore[no-untyped-def]
        try:
            seen.append((state.status, h.hmac_sha256(label, b"on change")))
        except HsmUnavailable as exc:
            seen.append((state.status, type(exc).__name__))

    h.add_listener(sign_on_change)
    try:
        plugged.set_shim(state="unplugged")
        with pytest.raises(HsmUnavailable):
            h.hmac_sha256(label, b"during")
        wait_for(lambda: ("degraded", "HsmUnavailable") in seen, 5.0, "the listener called on degraded")
        plugged.set_shim(state="plugged")
        wait_for(lambda: h.state.ready, 5.0, "ready again after replug")
        wait_for(lambda: ("ready", _mac(key, b"on change")) in seen, 5.0, "the listener signed on ready")
        assert h.hmac_sha256(label, b"after") == _mac(key, b"after")
    finally:
        h.close()
