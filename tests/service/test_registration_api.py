"""DPS registration on a leaf's behalf through the API (leaves behind an edge gateway cannot
reach DPS): the service signs with the leaf's key in the HSM, registers with the DPS emulator
over real MQTT/TLS using the azure-iot-device SDK, and hands back the assignment.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import addresses
import pytest
from cryptography.hazmat.primitives import serialization
from otlp_receiver import OtlpReceiver
from service_harness import ServiceHarness

from emulator.core import Emulator
from emulator.pki import EmulatorPki, PemFiles
from spyrus_hsm.config import CloudConfig
from spyrus_hsm.hsm import Hsm, Secret
from spyrus_hsm.telemetry import Telemetry

pytestmark = pytest.mark.timeout(90)

HOST = addresses.host()
SCOPE = "0ne000A51E"
POLICY = [{"principals": ["*"], "operations": ["registration"], "devices": ["{cn}"]}]


@pytest.fixture
def emu(make_emulator: Callable[..., Emulator]) -> Emulator:
    e = make_emulator(HOST, id_scope=SCOPE)
    e.polls_before_assigned = 1
    return e


@pytest.fixture
def cloud(emulator_pki: EmulatorPki) -> CloudConfig:
    return CloudConfig(provisioning_host=HOST, server_ca_file=str(emulator_pki.ca_file), id_scope=SCOPE)


def hsm_key(hsm: Hsm, label: str) -> str:
    """A random symmetric key imported into the HSM under `label`; returned in base64 for DPS."""
    raw = secrets.token_bytes(32)
    hsm.import_secret_key(label, Secret(raw))
    return base64.b64encode(raw).decode()


def register(svc: ServiceHarness, leaf: PemFiles, reg: str) -> tuple[int, dict[str, str], Any]:
    return svc.call("POST", "/v1/registrations",
                    {"registrationId": reg, "idScope": SCOPE, "attestation": "symmetricKey"}, cert=leaf)


def test_a_leaf_registers_through_the_api_and_reads_its_assignment_back(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, emu: Emulator, cloud: CloudConfig,
        rx: OtlpReceiver, telemetry: Telemetry) -> None:
    reg = "leafreg-" + secrets.token_hex(4)
    emu.add_individual_enrollment(reg, symmetric_key=hsm_key(hsm, reg), assigned_hub=HOST)
    leaf = emulator_pki.device(reg)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, cloud=cloud, telemetry=telemetry) as svc:
        status, _, assignment = register(svc, leaf, reg)
        assert status == 200, assignment
        assert (assignment["status"], assignment["assignedHub"], assignment["deviceId"],
                assignment["registrationId"], assignment["attestation"]) == ("assigned", HOST, reg, reg, "symmetricKey")
        status, _, stored = svc.call("GET", f"/v1/registrations/{reg}", cert=leaf)
        assert status == 200, stored
        assert stored == assignment
        audit = [(r["operation"], r["principal"], r["device"], r["key"], r["outcome"]) for r in svc.audit_records()]
        assert audit == [("registration", reg, reg, reg, "allowed"), ("registration", reg, reg, None, "allowed")]
    assert [(a.device_id, a.assigned_hub, a.enrollment) for a in emu.received.assignments
            if a.registration_id == reg] == [(reg, HOST, f"individual:{reg}")]

    # One trace: the server span, the registration under it, the DPS token signed in the HSM under that.
    assert telemetry.force_flush()
    [server] = rx.wait_for_spans(lambda s: s.name == "POST /v1/registrations")
    [dps] = rx.wait_for_spans(lambda s: s.name == "dps.register")
    assert (dps.trace_id, dps.parent_span_id) == (server.trace_id, server.span_id)
    assert (dps.attributes["dps.registration_id"], dps.attributes["dps.status"]) == (reg, "assigned")
    signs = rx.wait_for_spans(lambda s: s.name == "hsm.sign" and s.trace_id == server.trace_id)
    assert {s.parent_span_id for s in signs} == {dps.span_id}
    assert {s.attributes["hsm.key.label"] for s in signs} == {reg}


def test_a_group_enrollment_leaf_registers_with_a_key_derived_in_the_hsm(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, emu: Emulator, cloud: CloudConfig) -> None:
    group = "group-" + secrets.token_hex(4)
    emu.add_group_enrollment(group, symmetric_key=hsm_key(hsm, group), assigned_hub=HOST)
    reg = "grpleaf-" + secrets.token_hex(4)
    leaf = emulator_pki.device(reg)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, cloud=cloud, group_key=group) as svc:
        status, _, assignment = register(svc, leaf, reg)
        assert status == 200, assignment
        assert (assignment["status"], assignment["assignedHub"], assignment["deviceId"]) == ("assigned", HOST, reg)
        status, _, stored = svc.call("GET", f"/v1/registrations/{reg}", cert=leaf)
        assert (status, stored) == (200, assignment)
    assert [a.enrollment for a in emu.received.assignments if a.registration_id == reg] == [f"group:{group}"]
    derived = next(o for o in hsm.list_objects() if o.label == f"{group}.{reg}")
    assert (derived.sensitive, derived.extractable) == (True, False)  # the leaf's key never left the HSM


def test_a_leaf_may_not_register_or_read_another_id(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, emu: Emulator, cloud: CloudConfig) -> None:
    mine, theirs = "leafa-" + secrets.token_hex(4), "leafb-" + secrets.token_hex(4)
    emu.add_individual_enrollment(theirs, symmetric_key=hsm_key(hsm, theirs), assigned_hub=HOST)
    leaf = emulator_pki.device(mine)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, cloud=cloud) as svc:
        status, headers, problem = register(svc, leaf, theirs)
        assert status == 403, problem
        assert headers["content-type"].startswith("application/problem+json")
        assert problem["type"].endswith("/forbidden") and theirs in problem["detail"]
        status, _, problem = svc.call("GET", f"/v1/registrations/{theirs}", cert=leaf)
        assert status == 403, problem
        assert [r["outcome"] for r in svc.audit_records()] == ["denied", "denied"]
    assert not [r for r in emu.received.registrations if r.registration_id == theirs]  # DPS never asked


def test_concurrent_registrations_share_only_identical_requests(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, emu: Emulator, cloud: CloudConfig) -> None:
    reg = "leafc-" + secrets.token_hex(4)
    emu.add_individual_enrollment(reg, symmetric_key=hsm_key(hsm, reg), assigned_hub=HOST)
    emu.polls_before_assigned = 2  # each registration takes two polls, so the requests overlap
    leaf = emulator_pki.device(reg)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, cloud=cloud) as svc:
        def post(payload: Any) -> tuple[int, Any]:
            status, _, body = svc.call("POST", "/v1/registrations", {
                "registrationId": reg, "idScope": SCOPE, "attestation": "symmetricKey", "payload": payload}, cert=leaf)
            return status, body

        def sent() -> list[Any]:
            return [r.payload for r in emu.received.registrations if r.registration_id == reg]

        with ThreadPoolExecutor(2) as pool:
            different = list(pool.map(post, [{"n": 1}, {"n": 2}]))
        assert [status for status, _ in different] == [200, 200], different
        assert sorted(sent(), key=json.dumps) == [{"n": 1}, {"n": 2}]  # each request reached DPS

        with ThreadPoolExecutor(2) as pool:
            same = list(pool.map(post, [{"n": 3, "m": [1]}, {"m": [1], "n": 3}]))
        assert [status for status, _ in same] == [200, 200], same
        assert same[0] == same[1]
        assert sent().count({"n": 3, "m": [1]}) == 1  # identical requests shared one registration


# --- certificate issuance for a leaf's own key ----------------------------------------------

CSR_POLICY = [{"principals": ["*"], "operations": ["registration", "certificate-issue"], "devices": ["{cn}"]}]


def leaf_csr(cn: str, key: Any = None) -> str:
    """The leaf's CSR, base64 DER; its key is the leaf's own (software here: the leaf is another
    device), never in this module."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode()


def enrolled_leaf(hsm: Hsm, emu: Emulator, pki: EmulatorPki, prefix: str) -> tuple[str, PemFiles]:
    """A registration id enrolled with a symmetric key held in the HSM, and its leaf's TLS files."""
    reg = prefix + secrets.token_hex(4)
    emu.add_individual_enrollment(reg, symmetric_key=hsm_key(hsm, reg), assigned_hub=HOST)
    return reg, pki.device(reg)


def register_csr(svc: ServiceHarness, leaf: PemFiles, reg: str, csr: str) -> tuple[int, dict[str, str], Any]:
    return svc.call("POST", "/v1/registrations", {"registrationId": reg, "idScope": SCOPE,
                                                  "attestation": "symmetricKey", "csr": csr}, cert=leaf)


def test_a_leaf_csr_is_issued_a_chain_that_verifies_to_the_dps_ca(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, emu: Emulator, cloud: CloudConfig) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from spyrus_hsm.identity import x509 as x509_id

    reg, leaf = enrolled_leaf(hsm, emu, emulator_pki, "leafcsr-")
    key = ec.generate_private_key(ec.SECP384R1())
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=CSR_POLICY, cloud=cloud) as svc:
        status, _, answer = register_csr(svc, leaf, reg, leaf_csr(reg, key))
        assert status == 200, answer
        audit = [(r["operation"], r["outcome"]) for r in svc.audit_records()]
    assert (answer["status"], answer["deviceId"]) == ("assigned", reg)
    chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in answer["issuedCertificateChain"]]
    x509_id.validate_chain(chain, trust_anchor=emu.certificate_authority)
    assert chain[0].public_key() == key.public_key()
    assert answer["certificate"]["subject"] == f"CN={reg}" and answer["certificate"]["label"] is None
    assert audit == [("certificate-issue", "allowed")]
    assert not hsm.find(reg, "cert")  # the leaf's key is not here: nothing is stored in the HSM


def test_a_leaf_csr_needs_the_certificate_issue_operation(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, emu: Emulator, cloud: CloudConfig) -> None:
    reg, leaf = enrolled_leaf(hsm, emu, emulator_pki, "leafnoci-")
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=POLICY, cloud=cloud) as svc:
        status, _, problem = register_csr(svc, leaf, reg, leaf_csr(reg))
        assert status == 403, problem
        assert "certificate-issue" in problem["detail"]
        status, _, answer = register(svc, leaf, reg)  # without a CSR: allowed as before
        assert status == 200 and "issuedCertificateChain" not in answer
    assert [r.status_code for r in emu.received.registrations if r.registration_id == reg] == [202]


def test_a_leaf_csr_for_another_id_or_malformed_or_weak_is_a_400(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, emu: Emulator, cloud: CloudConfig) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    reg, leaf = enrolled_leaf(hsm, emu, emulator_pki, "leafbad-")
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=CSR_POLICY, cloud=cloud) as svc:
        for csr, says in [(leaf_csr(reg + "-other"), "CN must be the registration id"),
                          (base64.b64encode(b"not a request").decode(), "not a DER PKCS#10"),
                          ("%%%", "padded base64"),
                          (leaf_csr(reg)[:-8] + "AAAAAAA=", "")]:
            status, _, problem = register_csr(svc, leaf, reg, csr)
            assert status == 400, (csr, problem)
            assert says in problem["detail"]
        assert not [r for r in emu.received.registrations if r.registration_id == reg]  # none reached DPS
        # A weak key passes the local checks; DPS refuses it and the leaf is told why, as a 400.
        status, _, problem = register_csr(svc, leaf, reg, leaf_csr(reg, rsa.generate_private_key(65537, 1024)))
        assert status == 400, problem
        assert "DPS refused the certificate signing request" in problem["detail"] and "too weak" in problem["detail"]


def test_a_leaf_whose_key_is_in_the_hsm_gets_its_chain_stored_there(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, emu: Emulator, cloud: CloudConfig) -> None:
    from spyrus_hsm.hsm import KeyAlgorithm

    reg, leaf = enrolled_leaf(hsm, emu, emulator_pki, "leafhsm-")
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=CSR_POLICY, cloud=cloud) as svc:
        status, _, problem = svc.call("POST", "/v1/registrations", {
            "registrationId": reg, "idScope": SCOPE, "attestation": "symmetricKey", "csr": leaf_csr(reg),
            "issueCertificate": True}, cert=leaf)
        assert status == 400 and "not both" in problem["detail"]
        status, _, answer = svc.call("POST", "/v1/registrations", {
            "registrationId": reg, "idScope": SCOPE, "attestation": "symmetricKey", "issueCertificate": True},
            cert=leaf)
        assert status == 200, answer
    label = f"{reg}.operational"
    assert answer["certificate"]["label"] == label
    assert hsm.key_algorithm(label) is KeyAlgorithm.EC_P384
    [private] = hsm.find(label, "private")
    assert (private.sensitive, private.extractable) == (True, False)
    stored = hsm.certificate_chain(label)
    assert [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in stored] == \
        answer["issuedCertificateChain"]
    assert stored[0].public_key() == hsm.public_key(label)
