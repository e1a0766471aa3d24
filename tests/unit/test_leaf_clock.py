"""A leaf schedules renewal from the token's life as the service states it, counted on its own
monotonic clock: a wrong wall clock on the leaf (ahead by more than the TTL, or at 1970 after a
boot without a real-time clock) neither renews in a tight loop nor waits for decades.

The service is a small HTTPS token service on loopback whose clock is set apart from the leaf's
(its expiresOn and Date header follow its own clock), which is what a leaf with a wrong clock sees.

And the API's own short-lived TLS certificate (service/server_tls, the issued placement), as the
API serves it over TLS, verifies for a leaf whose clock is off by up to 24 h either way, at any
moment of the certificate's time in service (from its issue to its renewal at half its life);
a leaf 40 h ahead is refused, as docs/leaf-devices.md says.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import secrets
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from service_harness import store_hsm_certificate

from emulator.pki import EmulatorPki
from spyrus_hsm.config import service_section
from spyrus_hsm.hsm import Hsm
from spyrus_hsm.identity.service_ca import BACKDATE
from spyrus_hsm.leaf import LeafDevice, TokenService
from spyrus_hsm.service.api_tls import Placement, ServerTls

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


# --- the API's short-lived TLS certificate, verified by a leaf whose clock is off ------------------

HOUR = 3600


class FixedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def served_chain(ctx: ssl.SSLContext) -> list[x509.Certificate]:
    """The chain a TLS client is sent by a server with context `ctx` (the API's listening one),
    as `openssl s_client` receives it."""
    with socket.create_server((HOST, 0)) as listener:
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)  # until the client closes
                except (ssl.SSLError, OSError):
                    pass

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        out = subprocess.run(["openssl", "s_client", "-connect", f"{HOST}:{port}", "-showcerts"],
                             input=b"", capture_output=True, timeout=30, check=False)
        thread.join(10)
    return x509.load_pem_x509_certificates(out.stdout)


def leaf_verifies(chain: list[x509.Certificate], root: Path, at: float, tmp_path: Path) -> tuple[bool, str]:
    """`openssl verify` of the served chain for the API's address, at the leaf's time `at`."""
    leaf_file, untrusted = tmp_path / "served.pem", tmp_path / "served-issuers.pem"
    leaf_file.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    untrusted.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:]))
    out = subprocess.run(["openssl", "verify", "-attime", str(int(at)), "-purpose", "sslserver",
                          "-verify_ip", HOST, "-CAfile", str(root), "-untrusted", str(untrusted), str(leaf_file)],
                         capture_output=True, text=True, timeout=30, check=False)
    return out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def api_tls(hsm: Hsm, emulator_pki: EmulatorPki, tmp_path: Path) -> Iterator[tuple[ServerTls, FixedClock]]:
    """The API's TLS credential in the issued placement, with the default lifetime (72 h), on a
    clock of the test's; its renewal thread never wakes by itself (the test moves the clock)."""
    label = "api-leaf-clock-" + secrets.token_hex(3)
    store_hsm_certificate(hsm, label, emulator_pki, server_ip=HOST, issuing=True,
                          valid=(-3 * dt.timedelta(days=1), 30 * dt.timedelta(days=1)))
    clock = FixedClock(time.time())
    cfg = service_section({"tls_key_label": label, "policy": []}, "test")
    server_tls = ServerTls(cfg, hsm, tmp_path / "tls", clock=clock,
                           wait=lambda event, seconds: event.wait())
    assert server_tls.placement is Placement.ISSUED and cfg.tls_lifetime == 72 * HOUR
    yield server_tls, clock
    server_tls.close()


# When the leaf connects: just after the certificate was made, or just before its renewal (at half
# its life, 36 h later: the moment it has least life left). The leaf's clock: off by this much.
@pytest.mark.parametrize(("served_after", "leaf_off_by", "verifies"), [
    (0, -24 * HOUR, True), (0, 24 * HOUR, True),
    (36 * HOUR - 2, -24 * HOUR, True), (36 * HOUR - 2, 24 * HOUR, True),
    (36 * HOUR - 2, 40 * HOUR, False),   # past the certificate's end by the leaf's clock
], ids=["new-24h-behind", "new-24h-ahead", "due-24h-behind", "due-24h-ahead", "due-40h-ahead"])
def test_the_served_short_lived_certificate_verifies_for_a_leaf_whose_clock_is_a_day_off(
        api_tls: tuple[ServerTls, FixedClock], emulator_pki: EmulatorPki, tmp_path: Path,
        served_after: float, leaf_off_by: float, verifies: bool) -> None:
    server_tls, clock = api_tls
    issued_at = clock.now
    clock.now += served_after
    assert server_tls.not_serving() is None
    chain = served_chain(server_tls.listening)
    assert len(chain) >= 2, "no chain served"
    served = chain[0]
    assert served.not_valid_before_utc.timestamp() <= issued_at - BACKDATE.total_seconds() < \
        served.not_valid_before_utc.timestamp() + 1
    ok, said = leaf_verifies(chain, emulator_pki.ca_file, clock.now + leaf_off_by, tmp_path)
    assert ok == verifies, said
    if not verifies:  # refused for the short-lived certificate's end, nothing else
        assert "at 0 depth lookup: certificate has expired" in said, said
