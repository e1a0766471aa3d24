"""A serial token (`hsm.serial: true`) behind the shim in its USB mode (serial=1, 20 ms per
signature): one worker signs, and a request somebody waits for is signed before background
work (refreshes of cached tokens) queued ahead of it.

The order is the one in which the signatures reach the token: `Hsm.instrument` wraps each
operation on the worker thread right around its PKCS#11 call, and with one worker that is the
token's order. The first signature is held in the wrapper until everything else is queued, so
the queue's contents when the worker comes back do not depend on timing.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from spyrus_hsm.hsm import Hsm, PoolSettings, Secret, SignAlgorithm, TokenSelector

pytestmark = [pytest.mark.shim, pytest.mark.timeout(60)]


class SignOrder:
    """Records which data each signature was for, in the order they reach the token, and on
    which thread; holds the first one back until `release` is set."""

    def __init__(self, hsm: Hsm) -> None:
        self.order: list[bytes] = []
        self.threads: set[str] = set()
        self.first_running = threading.Event()
        self.release = threading.Event()
        hsm.instrument(self._wrap)

    def _wrap(self, fn: Callable[[Any], Any], operation: str, key: str | None,
              mechanism: str | None) -> Callable[[Any], Any]:
        data: bytes = fn.keywords["data"]  # type: ignore[attr-defined]  # a partial of ops.sign

        def recorded(session: Any) -> Any:
            self.order.append(data)
            self.threads.add(threading.current_thread().name)
            if len(self.order) == 1:
                self.first_running.set()
                self.release.wait(30)
            return fn(session)
        return recorded


@pytest.fixture
def serial_hsm(token_env: Any) -> Iterator[tuple[Hsm, str]]:
    token_env.set_shim(state="plugged", sign_delay_ms=20, serial=1)
    settings = PoolSettings(token_env.module, TokenSelector(token_env.label), workers=4, serial=True, queue_limit=16,
                            call_timeout=20.0)
    hsm = Hsm(settings, Secret(token_env.pin)).start(wait=True)
    label = "serial-" + secrets.token_hex(4)
    hsm.import_secret_key(label, Secret(secrets.token_bytes(32)))
    yield hsm, label
    hsm.close()
    token_env.set_shim(state="plugged")


def test_a_waiting_request_is_signed_before_queued_background_refreshes(serial_hsm: tuple[Hsm, str]) -> None:
    hsm, key = serial_hsm
    signs = SignOrder(hsm)

    async def scenario() -> None:
        def sign(data: bytes, background: bool = False) -> asyncio.Task[bytes]:
            return asyncio.ensure_future(hsm.asign(key, SignAlgorithm.HMAC_SHA256, data, background=background))

        first = sign(b"first")
        while not signs.first_running.is_set():  # the one worker is now busy with it
            await asyncio.sleep(0.005)
        refreshes = [sign(b"refresh-%d" % i, background=True) for i in range(5)]
        while hsm.queue_depth() < 6:
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the refreshes' batch is flushed to the pool's queue
        miss = sign(b"miss")
        while hsm.queue_depth() < 7:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        signs.release.set()
        await asyncio.gather(first, *refreshes, miss)

    asyncio.run(scenario())
    assert signs.order == [b"first", b"miss", *(b"refresh-%d" % i for i in range(5))]
    assert len(signs.threads) == 1  # serial: one worker, one session


def test_background_work_may_fill_only_half_the_queue(serial_hsm: tuple[Hsm, str]) -> None:
    hsm, key = serial_hsm
    signs = SignOrder(hsm)
    limit = hsm.settings.queue_limit

    async def scenario() -> tuple[int, int]:
        def sign(background: bool) -> asyncio.Task[bytes]:
            return asyncio.ensure_future(hsm.asign(key, SignAlgorithm.HMAC_SHA256, b"x", background=background))

        first = sign(False)
        while not signs.first_running.is_set():
            await asyncio.sleep(0.005)
        background = [sign(True) for _ in range(limit)]
        urgent = [sign(False) for _ in range(limit // 2)]
        await asyncio.sleep(0)
        signs.release.set()
        outcomes = await asyncio.gather(first, *background, *urgent, return_exceptions=True)
        refused_bg = sum(isinstance(o, Exception) for o in outcomes[1:1 + limit])
        refused_urgent = sum(isinstance(o, Exception) for o in outcomes[1 + limit:])
        return refused_bg, refused_urgent

    refused_bg, refused_urgent = asyncio.run(scenario())
    assert refused_bg == limit - (limit // 2 - 1)  # the first request holds one place
    assert refused_urgent == 0
