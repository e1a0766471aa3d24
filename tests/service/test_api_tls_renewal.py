"""The API's short-lived TLS credential renewing by itself through an HSM outage (the `api-tls`
thread of service/server_tls), faults from tests/p11shim: a renewal that meets an unplugged
token keeps the current credential, says why and when it tries again; once the token is back it
renews at once, without being asked. Runs in the pytest process whose module is the shim."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from service_harness import HOST, store_hsm_certificate
from waiting import wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.config import service_section
from spyrus_hsm.hsm import Hsm
from spyrus_hsm.service.server_tls import Placement, ServerTls

pytestmark = [pytest.mark.shim, pytest.mark.timeout(90)]
GUARD = 30.0  # seconds: only so that a credential that never renews fails instead of hanging


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def plugged(token_env: Any, hsm: Hsm) -> Iterator[Any]:
    token_env.set_shim(state="plugged")
    yield token_env
    token_env.set_shim(state="plugged")
    wait_for(lambda: hsm.state.ready, GUARD, "the HSM ready after the test")


def test_a_renewal_that_meets_an_unplugged_token_keeps_the_credential_and_renews_once_it_is_back(
        hsm: Hsm, plugged: Any, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    label = "api-renew-" + str(int(time.time() * 1000) % 100000)
    store_hsm_certificate(hsm, label, emulator_pki, server_ip=HOST, issuing=True)
    cfg = service_section({"tls_key_label": label, "tls_lifetime": 3600, "policy": []}, "test")
    clock = Clock()
    server_tls = ServerTls(cfg, hsm, tmp_path / "tls", clock=clock)
    try:
        assert server_tls.placement is Placement.ISSUED
        first, not_after = server_tls.current, server_tls.not_after
        assert not_after is not None
        clock.now += 1801  # past half of the hour: due
        plugged.set_shim(state="unplugged")
        server_tls.renew()  # what the thread does when due; the token is away (the pool notices)
        assert server_tls.current is first and server_tls.last_error
        assert server_tls.not_serving() is None  # the current certificate is still valid
        plugged.set_shim(state="plugged")
        # Nobody asks again: the thread renews by itself once the HSM is back.
        wait_for(lambda: server_tls.current is not first, GUARD, "renewed after the replug")
        assert server_tls.last_error is None
        assert server_tls.not_after is not None and server_tls.not_after > not_after
        clock.now = server_tls.not_after + 1  # and were it to expire unrenewed, readiness says so
        assert "expired" in (server_tls.not_serving() or "")
    finally:
        server_tls.close()
