"""The state volume across releases: a state directory written the way release 0.1.0 wrote it is
read by this one without loss (docs/deployment/upgrade.md, "The state volume"). The registration
cache is reused (DPS is not asked again: the provisioning host here is a closed port, so asking
would fail), and the audit log is appended to, its old records kept."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from spyrus_hsm.hsm import Secret
from spyrus_hsm.service.audit import AuditLog

pytestmark = pytest.mark.timeout(60)
SCOPE = "0ne00C0MPA"
CLOSED = "127.0.0.1:9"  # nothing listens: a registration that reached for DPS would fail

# Lines of audit.log as 0.1.0 wrote them (time with +00:00, no count/since), and one torn by a
# crash in the middle of a write: no final newline.
OLD_AUDIT = (
    '{"time": "2026-11-30T10:00:00.123000+00:00", "principal": "line-3-plc", "operation": "sas-token", '
    '"key": "line-3-plc", "device": "line-3-plc", "outcome": "allowed", "reason": "policy", "status": 200, '
    '"requestId": "r-1", "remote": "10.0.0.7"}\n'
    '{"time": "2026-11-30T10:00:01.456000+00:00", "principal": null, "operation": "sas-token", '
    '"key": null, "device": null, "outcome": "denied", "reason": "unauthenticated", "status": 401, '
    '"requestId": "r-2", "remote": "10.0.0.8"}\n'
    '{"time": "2026-11-30T10:00:02.789000+00:00", "principal": "line-3-pl'
)


def old_registration(registration_id: str, key_label: str, key_id_hex: str) -> dict[str, object]:
    """registrations/<id>.json as 0.1.0's Assignment.to_json wrote it: no certificate_chain or
    certificate_label, registered_at with +00:00, the identity fingerprint of its _fingerprint."""
    parts = [CLOSED, SCOPE, registration_id, "symmetricKey", "False", key_id_hex]
    return {"registration_id": registration_id, "assigned_hub": "plant-7.azure-devices.net",
            "device_id": registration_id, "status": "assigned", "substatus": "initialAssignment",
            "attestation": "symmetricKey", "identity": hashlib.sha256("\n".join(parts).encode()).hexdigest(),
            "registered_at": "2026-11-30T09:59:58.000001+00:00", "key": key_label}


def test_a_state_directory_of_the_previous_release_is_read_without_loss(
        cli, token_env, hsm, label, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hsm.import_secret_key(label, Secret(b"\x05" * 32))
    [key] = hsm.find(label, "secret-key")
    state = tmp_path / "state"
    (state / "registrations").mkdir(parents=True)
    old = old_registration(label, label, key.id_hex)
    (state / "registrations" / f"{label}.json").write_text(json.dumps(old))
    (state / "audit.log").write_text(OLD_AUDIT)
    config = tmp_path / "config.yaml"
    config.write_text(f"hsm:\n  module: {token_env.module}\n  token_label: {token_env.label}\n"
                      f"  pin_file: {token_env.pin_file}\nstate_dir: {state}\n")

    res = cli("--config", str(config), "register", "--id-scope", SCOPE, "--registration-id", label,
              "--sas-key", label, "--provisioning-host", CLOSED, "--timeout", "5",
              env=token_env.env(SPYRUS_HSM_CONFIG=""))
    assert res.code == 0, res.out + res.err
    assignment = json.loads(res.out)
    assert (assignment["assignedHub"], assignment["deviceId"], assignment["status"]) == (
        "plant-7.azure-devices.net", label, "assigned")
    assert assignment["registeredAt"] == old["registered_at"] and "issuedCertificateChain" not in assignment
    assert json.loads((state / "registrations" / f"{label}.json").read_text()) == old  # not rewritten

    async def one_record() -> None:
        audit = AuditLog(str(state / "audit.log"), fail_closed=True)
        try:
            await audit.submit(wait=True, principal="line-3-plc", operation="sas-token", outcome="allowed",
                               reason="policy", key="line-3-plc", device="line-3-plc", status=200,
                               request_id="r-3", remote="10.0.0.7")
        finally:
            assert audit.close()

    asyncio.run(one_record())
    text = (state / "audit.log").read_text()
    assert text.startswith(OLD_AUDIT)  # every old byte kept
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2] == OLD_AUDIT.splitlines()[2]
    assert json.loads(lines[3])["requestId"] == "r-3"  # on a line of its own after the torn one
    assert [json.loads(ln)["requestId"] for ln in lines[:2]] == ["r-1", "r-2"]
