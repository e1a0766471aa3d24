"""A leaf device through edgeHub with `spyrus_hsm.leaf`: its SAS tokens come from the real HTTPS
service (signed in the session's SoftHSM token with the leaf's key), it connects over MQTT/TLS to
the emulator acting as its gateway, renews through the service, and rides out the service being
stopped and started again.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import addresses
import pytest
from service_harness import HOST, Leaf, ServiceHarness, free_port, new_leaf, verify_sas

from emulator import Emulator
from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm
from spyrus_hsm.leaf import LeafDevice, TokenRefused, TokenService, token_backoff

GATEWAY = addresses.host()
HUB = "hub.example"  # the hub ServiceHarness's service mints tokens for
TTL = 60             # the shortest the service may be configured to hand out
POLICY = [{"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}]
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


class Site:
    """The gateway (emulator) with the leaf registered, and the token service on a fixed port
    (so that it can be stopped and started again at the same URL)."""

    def __init__(self, hsm: Hsm, directory: Path, pki: EmulatorPki, emu: Emulator) -> None:
        self.hsm, self.directory, self.pki, self.emu = hsm, directory, pki, emu
        self.leaf: Leaf = new_leaf(hsm)
        emu.add_device(self.leaf.name, symmetric_key=base64.b64encode(self.leaf.key).decode())
        self.port = free_port()
        self.service: ServiceHarness | None = None

    def start_service(self) -> None:
        self.service = ServiceHarness(self.hsm, self.directory, self.pki, policy=POLICY,
                                      bearer={self.leaf.name: self.leaf.bearer}, port=self.port, min_ttl=TTL)
        self.service.__enter__()

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None

    def tokens(self, **options: Any) -> TokenService:
        return TokenService(f"https://{HOST}:{self.port}", str(self.pki.ca_file), self.leaf.name,
                            bearer_token=self.leaf.bearer, **options)

    def telemetry(self) -> list[Any]:
        return [t.json() for t in self.emu.received.telemetry if t.device_id == self.leaf.name]


@pytest.fixture
def site(hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki,
         make_emulator: Callable[..., Emulator]) -> Iterator[Site]:
    s = Site(hsm, tmp_path, emulator_pki, make_emulator(GATEWAY, hub_hostname=HUB))
    s.start_service()
    yield s
    s.stop_service()


def test_a_leaf_sends_through_edgehub_renews_and_rides_out_a_service_outage(site: Site) -> None:
    tokens = site.tokens(ttl=TTL, backoff=token_backoff(0.2, 2.0))
    device = LeafDevice(tokens, GATEWAY, str(site.pki.ca_file), renew_at=0.25).connect()
    try:
        device.client.send_message(json.dumps({"n": 0}))
        assert site.telemetry() == [{"n": 0}]
        first = site.emu.received.accepted_connects(site.leaf.name)[0]
        assert first.auth_method == "sas" and first.username.startswith(f"{HUB}/{site.leaf.name}/")

        site.emu.wait_for(lambda: device.renewals >= 3, timeout=120)
        assert len(site.emu.received.accepted_connects(site.leaf.name)) >= 4  # each renewal reconnects

        due = device.renew_time
        assert due is not None
        time.sleep(max(0.0, due - time.time() - 2))  # the service goes away just before a renewal
        renewed = device.renewals
        site.stop_service()
        for n in range(1, 11):  # 10 s without the service: telemetry still flows
            device.client.send_message(json.dumps({"n": n}))
            time.sleep(1)
        assert device.renewals == renewed and tokens.retries > 0
        site.start_service()

        site.emu.wait_for(lambda: device.renewals > renewed, timeout=30)
        device.client.send_message(json.dumps({"n": 11}))
        assert [t["n"] for t in site.telemetry()] == list(range(12))
        expired = [d for d in site.emu.received.disconnects if d.client_id == site.leaf.name and "expired" in d.reason]
        assert expired == []
    finally:
        device.close()


def test_a_refused_leaf_gets_the_services_reason_without_retrying(site: Site) -> None:
    tokens = TokenService(f"https://{HOST}:{site.port}", str(site.pki.ca_file), site.leaf.name,
                          bearer_token="not-the-leafs-token")
    with pytest.raises(TokenRefused, match="HTTP 401") as info:
        tokens.fetch()
    assert tokens.retries == 0 and "not-the-leafs-token" not in str(info.value)


def test_a_leaf_with_a_client_certificate_gets_its_token(site: Site) -> None:
    cert = site.pki.device(site.leaf.name)
    tokens = TokenService(f"https://{HOST}:{site.port}", str(site.pki.ca_file), site.leaf.name,
                          client_cert=(str(cert.cert_file), str(cert.key_file)), ttl=TTL)
    token = tokens.fetch()
    assert token.token.startswith(f"SharedAccessSignature sr={HUB}%2Fdevices%2F{site.leaf.name}&")
    verify_sas(token.token, site.leaf.key)


def test_the_leaf_client_imports_nothing_of_pkcs11() -> None:
    code = ("import sys, spyrus_hsm.leaf; "
            "print(sorted(m for m in sys.modules if 'pkcs11' in m or m.startswith('spyrus_hsm.hsm')))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT / "modules")},
                         capture_output=True, timeout=60, check=True)
    assert out.stdout.decode().strip() == "[]"


def test_a_rate_limited_leaf_retries_and_gets_its_token(site: Site) -> None:
    """The rate limit (one request per two seconds, burst 1) answers 429 with Retry-After."""
    assert site.service is not None
    site.service.run(_reconfigure(site.service, rate_limit_per_second=0.5, rate_limit_burst=1))
    tokens = site.tokens(ttl=TTL, backoff=token_backoff(0.1, 5.0))
    tokens.fetch()
    assert tokens.fetch(min_remaining=TTL).expires_on > time.time()
    assert tokens.retries >= 1


async def _reconfigure(service: ServiceHarness, **changes: Any) -> None:
    assert service.service is not None
    service.service.reconfigure(replace(service.cfg, **changes))


def test_the_example_runs_against_the_service(site: Site) -> None:
    env = {"PYTHONPATH": str(ROOT / "modules"), "LEAF_SERVICE_URL": f"https://{HOST}:{site.port}",
           "LEAF_GATEWAY": GATEWAY, "LEAF_TRUST_ANCHOR": str(site.pki.ca_file), "LEAF_DEVICE_ID": site.leaf.name,
           "LEAF_MESSAGES": "3"}
    token_file = site.directory / "leaf-bearer"
    token_file.write_text(site.leaf.bearer)
    env["LEAF_BEARER_TOKEN_FILE"] = str(token_file)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "leaf_device.py")], env=env,
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(site.telemetry()) == 3 and site.leaf.bearer not in proc.stdout.decode() + proc.stderr.decode()
