"""First end-to-end checks of the signing service: a token for a leaf, by bearer and by certificate."""

from __future__ import annotations

import secrets
from pathlib import Path

from service_harness import ServiceHarness, verify_sas

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret


def test_sas_token_by_bearer_and_by_certificate(hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    device = "leaf-" + secrets.token_hex(3)
    key = secrets.token_bytes(32)
    hsm.import_secret_key(device, Secret(key))
    bearer = secrets.token_urlsafe(24)
    policy = [{"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}]
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=policy, bearer={device: bearer}) as svc:
        status, headers, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": device}, bearer=bearer)
        assert status == 200, body
        fields = verify_sas(body["token"], key)
        assert fields["sr"] == f"hub.example/devices/{device}" == body["resourceUri"]
        cert = emulator_pki.device(device)
        status, _, body2 = svc.call("POST", "/v1/sas-tokens", {"deviceId": device}, cert=cert)
        assert status == 200, body2
        assert body2["token"] == body["token"]  # the cached token
        status, headers, problem = svc.call("POST", "/v1/sas-tokens", {"deviceId": device})
        assert status == 401 and headers["content-type"].startswith("application/problem+json"), problem
        records = svc.audit_records()
        assert [r["outcome"] for r in records] == ["allowed", "allowed", "unauthenticated"]
