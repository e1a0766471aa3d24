"""Keys have one job (service/keyroles.py), over real HTTPS with the session's SoftHSM token: a
policy that allows everything still cannot make the API sign with a key the module uses for
itself or one that mints credentials, and the answer is word for word the one for a key that
does not exist. Against the previous version every `reserved` case below was signed (200)."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

import pytest
from service_harness import HOST, ServiceHarness, new_leaf, problem_type, store_hsm_certificate

from emulator.pki import EmulatorPki
from spyrus_hsm.config import CloudConfig
from spyrus_hsm.hsm import Hsm, KeyAlgorithm, Secret

EVERYTHING = {"principals": ["*"], "operations": ["*"], "devices": ["*"], "keys": ["*"]}


def _sign(svc: ServiceHarness, bearer: str, key: str, algorithm: str) -> tuple[int, dict[str, str], Any]:
    return svc.call("POST", "/v1/signatures", {"key": key, "algorithm": algorithm,
                                               "data": base64.b64encode(b"tbsCertificate").decode()}, bearer=bearer)


def _as_unknown(svc: ServiceHarness, bearer: str, key: str, algorithm: str) -> None:
    """The answer for `key` is the answer for a key that does not exist, but for the label."""
    status, headers, body = _sign(svc, bearer, key, algorithm)
    ghost = "ghost-" + secrets.token_hex(3)
    g_status, _, g_body = _sign(svc, bearer, ghost, algorithm)
    assert (status, problem_type(headers, body)) == (g_status, "not-found") == (404, "not-found"), body
    assert {k: v for k, v in body.items() if k not in ("detail", "instance", "requestId")} == \
        {k: v for k, v in g_body.items() if k not in ("detail", "instance", "requestId")}
    assert body["detail"] == g_body["detail"].replace(ghost, key)


@pytest.fixture
def labels(hsm: Hsm, emulator_pki: EmulatorPki) -> dict[str, str]:
    """One key of each job on the token, named by job."""
    tag = secrets.token_hex(3)
    out = {"device": new_leaf(hsm, "dev").name, "group": f"group-{tag}", "cloud": f"cloud-{tag}",
           "identity": f"identity-{tag}", "operational": f"reg-{tag}.operational", "jws": f"jws-{tag}"}
    for job in ("group", "cloud"):
        hsm.import_secret_key(out[job], Secret(secrets.token_bytes(32)))
    store_hsm_certificate(hsm, out["identity"], emulator_pki, server_ip=HOST, issuing=True)  # as the API's own
    hsm.generate_keypair(out["operational"], KeyAlgorithm.EC_P384)  # a leaf's DPS-issued certificate key
    hsm.generate_keypair(out["jws"], KeyAlgorithm.EC_P256)  # declared for callers
    return out


@pytest.mark.parametrize("job, algorithm", [
    ("device", "HMAC-SHA256"),       # a SAS key: HMACs any string-to-sign, any lifetime
    ("group", "HMAC-SHA256"),        # a DPS group key: HMAC of a registration id is a device key
    ("cloud", "HMAC-SHA256"),        # the module's own identity
    ("identity", "ES256"),           # a key with a certificate: signs a TBSCertificate = a server cert
    ("operational", "ES384"),        # a leaf's DPS-issued certificate key
])
def test_a_rule_that_allows_everything_reaches_no_reserved_key(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, labels: dict[str, str], job: str, algorithm: str) -> None:
    caller = new_leaf(hsm, "caller")
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[EVERYTHING], bearer={caller.name: caller.bearer},
                        cloud=CloudConfig(key=labels["cloud"]), group_key=labels["group"],
                        signing_keys=("*",)) as svc:
        _as_unknown(svc, caller.bearer, labels[job], algorithm)
        status, _, body = _sign(svc, caller.bearer, labels["jws"], "ES256")  # declared, no other job
        records = svc.audit_records()
    assert status == 200, body
    refused = [(r["outcome"], r["status"]) for r in records if r["key"] == labels[job]]
    assert refused == [("rejected", 404)]  # audited once, as refused


def test_a_key_outside_the_signing_namespace_is_unknown_to_callers(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, labels: dict[str, str]) -> None:
    caller = new_leaf(hsm, "caller")
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[EVERYTHING], bearer={caller.name: caller.bearer},
                        signing_keys=("sign-*",)) as svc:
        _as_unknown(svc, caller.bearer, labels["jws"], "ES256")


@pytest.mark.parametrize("job", ["group", "cloud", "jws"])
def test_a_device_named_like_a_key_with_another_job_gets_no_sas_token(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, labels: dict[str, str], job: str) -> None:
    """sas_key '{deviceId}': a device called like the group key would get tokens signed by it."""
    caller = new_leaf(hsm, "caller")
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[EVERYTHING], bearer={caller.name: caller.bearer},
                        cloud=CloudConfig(key=labels["cloud"]), group_key=labels["group"],
                        signing_keys=("jws-*",)) as svc:
        status, headers, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": labels[job]}, bearer=caller.bearer)
        ok_status, _, ok_body = svc.call("POST", "/v1/sas-tokens", {"deviceId": labels["device"]}, bearer=caller.bearer)
    assert (status, problem_type(headers, body)) == (404, "not-found"), body
    assert body["detail"] == f"no secret-key object labelled '{labels[job]}'"  # as for a device without a key
    assert ok_status == 200, ok_body


@pytest.mark.parametrize("template_key", ["missing", "ec"])
def test_a_key_the_configuration_chose_is_never_named_to_the_caller(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, template_key: str) -> None:
    """The caller names a device; the label behind it (service.sas_key) is the operator's.
    Before: "no secret-key object labelled 'sas-…'" told the caller the template."""
    caller = new_leaf(hsm, "caller")
    device = f"dev-{secrets.token_hex(3)}"
    if template_key == "ec":  # a key there, but one that cannot HMAC
        hsm.generate_keypair(f"sas-{device}", KeyAlgorithm.EC_P256)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[EVERYTHING], bearer={caller.name: caller.bearer},
                        sas_key="sas-{deviceId}") as svc:
        status, _, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": device}, bearer=caller.bearer)
        records = svc.audit_records()
    assert 400 <= status < 500 and "sas-" not in body["detail"], body
    assert body["detail"] in (f"no key for device '{device}'", f"the HSM cannot use the key for device '{device}'")
    assert records[-1]["key"] == f"sas-{device}"  # the operator's record names it
