"""A leaf schedules renewal from the token's life as the service states it, counted on its own
monotonic clock: a wrong wall clock on the leaf (ahead by more than the TTL, or at 1970 after a
boot without a real-time clock) neither renews in a tight loop nor waits for decades.

The service is a small HTTPS token service on loopback whose clock is set apart from the leaf's
(its expiresOn and Date header follow its own clock), which is what a leaf with a wrong clock sees.
"""

from __future__ import annotations

import email.utils
import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from emulator.pki import EmulatorPki
from spyrus_hsm.leaf import LeafDevice, TokenService

HOST = "127.0.0.1"
TTL = 3600
DAY = 86400


class SkewedTokenService:
    """POST /v1/sas-tokens answers a TTL-long token by a clock `skew` seconds from the leaf's,
    with or without the expiresInSeconds field (a service that predates it sends only Date)."""

    def __init__(self, pki: EmulatorPki, skew: float, *, states_lifetime: bool) -> None:
        outer = self
        self.skew, self.states_lifetime = skew, states_lifetime

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                now = time.time() + outer.skew
                body: dict[str, Any] = {"token": "SharedAccessSignature sr=x&sig=y&se=1", "resourceUri": "x",
                                        "expiresOn": int(now) + TTL}
                if outer.states_lifetime:
                    body["expiresInSeconds"] = TTL
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def date_time_string(self, timestamp: float | None = None) -> str:
                return email.utils.formatdate(time.time() + outer.skew, usegmt=True)

            def log_message(self, *args: Any) -> None:
                pass

        files = pki.server([HOST])
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(files.cert_file), str(files.key_file))
        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://{HOST}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=[True, False], ids=["expiresInSeconds", "date-header"])
def states_lifetime(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def make_service(emulator_pki: EmulatorPki) -> Iterator[Any]:
    started: list[SkewedTokenService] = []

    def factory(skew: float, states_lifetime: bool) -> SkewedTokenService:
        started.append(SkewedTokenService(emulator_pki, skew, states_lifetime=states_lifetime))
        return started[-1]

    yield factory
    for s in started:
        s.close()


# The leaf's clock against the service's: two days ahead (more than the TTL), 30 years behind
# (a board that booted at 1970), right.
@pytest.mark.parametrize("leaf_ahead_by", [2 * DAY, -30 * 365 * DAY, 0], ids=["ahead", "behind", "right"])
def test_a_leaf_renews_after_the_share_of_the_life_the_service_stated_whatever_its_wall_clock_says(
        make_service: Any, emulator_pki: EmulatorPki, leaf_ahead_by: int, states_lifetime: bool) -> None:
    service = make_service(-leaf_ahead_by, states_lifetime)
    clock = FakeMonotonic()
    tokens = TokenService(service.url, str(emulator_pki.ca_file), "leaf", clock=clock)
    device = LeafDevice(tokens, "gateway", str(emulator_pki.ca_file), renew_at=0.8)
    device._token = tokens.fetch()  # as connect() does, without an edgeHub to connect to
    wait = device.seconds_to_renewal()
    assert wait is not None
    # Date has whole seconds, expiresOn too: the life as stated is TTL, less up to 2 s of rounding.
    assert 0.8 * (TTL - 2) <= wait <= 0.8 * TTL
    clock.now += 1000  # the leaf's monotonic clock moves on; its wall clock plays no part
    assert device.seconds_to_renewal() == pytest.approx(wait - 1000)
    clock.now += TTL
    assert device.seconds_to_renewal() == 0.0
