"""Operational certificates issued through DPS (certificate management) for keys born in the
HSM, end to end: real SoftHSM2, real pkcs11-provider, real MQTT/TLS against tests/emulator,
whose DPS verifies each CSR and signs it with its own P-384 issuing CA."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from pathlib import Path

import addresses
import pytest
from cloud_harness import sas_enrollment
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from token_matrix import HMAC_IMPORT, needs

from spyrus_hsm import times
from spyrus_hsm.cloud import dps_client
from spyrus_hsm.cloud.dps import CertificateRefused, DpsRequest, Provisioner
from spyrus_hsm.cloud.hub import HubClient, HubIdentity
from spyrus_hsm.hsm import Hsm, InvalidInput, KeyAlgorithm
from spyrus_hsm.identity import issued as issued_id
from spyrus_hsm.identity import x509 as x509_id

pytestmark = pytest.mark.timeout(90)
HOST = addresses.host()
SCOPE = "0ne000CE57"


def _sas_enrollment(hsm: Hsm, emu, reg: str, label: str) -> None:  # type: ignore[no-untyped-def]
    sas_enrollment(hsm, emu, reg, label, HOST)


def _req(reg: str, key: str, emulator_pki, **kw) -> DpsRequest:  # type: ignore[no-untyped-def]
    return DpsRequest(id_scope=SCOPE, registration_id=reg, provisioning_host=HOST, attestation="symmetricKey",
                      key=key, server_ca_pem=emulator_pki.ca_pem, **kw)


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str) -> bytes:
    """A leaf's own CSR (its key in software: the leaf is another device)."""
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def _private_key_files(*dirs: Path) -> list[str]:
    return [str(p) for d in dirs for p in d.rglob("*")
            if p.is_file() and b"PRIVATE KEY-----" in p.read_bytes()]


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
def test_symmetric_onboarding_gets_a_p384_hsm_key_certified_and_connects_with_it(
        hsm, provider, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "cm-" + label
    op = label + "-op"
    _sas_enrollment(hsm, emu, reg, label)
    state = tmp_path / "state"
    assignment = Provisioner(hsm, state).register(_req(reg, label, emulator_pki, issue_cert=op), timeout=30)
    assert (assignment.status, assignment.device_id, assignment.certificate_label) == ("assigned", reg, op)

    # The key was generated in the token for this, P-384, and cannot leave it.
    assert hsm.key_algorithm(op) is KeyAlgorithm.EC_P384
    [private] = hsm.find(op, "private")
    assert (private.sensitive, private.extractable) == (True, False)
    # The chain is stored beside the key (same CKA_ID, its own label) and leads to DPS's CA.
    certs = hsm.find(op, "cert")
    assert {c.id_hex for c in certs} == {private.id_hex} and sorted(c.category or "" for c in certs) == [
        "authority", "user"]
    chain = hsm.certificate_chain(op)
    assert chain[0].public_key() == hsm.public_key(op)
    assert x509_id.common_name(chain[0]) == reg
    x509_id.validate_chain(chain, trust_anchor=emu.certificate_authority)
    assert chain[0].signature_hash_algorithm is not None and chain[0].signature_hash_algorithm.name == "sha384"
    assert [base64.b64decode(c) for c in assignment.certificate_chain or []] == [
        c.public_bytes(serialization.Encoding.DER) for c in chain]

    # The hub accepts the HSM key (TLS client auth through pkcs11-provider) with that chain.
    files = x509_id.write_tls_files(x509_id.select(hsm, label=op), hsm.state.token_label or "", state / "tls")
    client = HubClient(hsm, HubIdentity(assignment.assigned_hub, assignment.device_id, x509=files,
                                        server_ca_pem=emulator_pki.ca_pem)).connect()
    try:
        client.send(json.dumps({"issued": True}))
        emu.wait_for(lambda: any(t.device_id == reg for t in emu.received.telemetry), timeout=10)
    finally:
        client.shutdown()
    assert any(c.client_id == reg and c.auth_method == "x509" and c.accepted for c in emu.received.connects)
    assert _private_key_files(tmp_path) == []


def test_the_issued_certificate_is_reused_then_replaced_for_the_same_key_when_asked(
        hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "cmr-" + label
    op = label + "-op"
    _sas_enrollment(hsm, emu, reg, label)
    prov = Provisioner(hsm, tmp_path)
    first = prov.register(_req(reg, label, emulator_pki, issue_cert=op), timeout=30)
    n = len(emu.received.registrations)
    assert prov.register(_req(reg, label, emulator_pki, issue_cert=op), timeout=30) == first
    assert len(emu.received.registrations) == n
    key_id = hsm.find(op, "private")[0].id_hex
    second = prov.register(_req(reg, label, emulator_pki, issue_cert=op), force=True, timeout=30)
    assert second.certificate_chain != first.certificate_chain
    assert hsm.find(op, "private")[0].id_hex == key_id  # the same key, a new certificate
    assert [c.category for c in hsm.find(op, "cert")].count("user") == 1
    assert hsm.certificate_chain(op)[0].public_bytes(serialization.Encoding.DER) == base64.b64decode(
        (second.certificate_chain or [""])[0])


def test_issued_certificates_live_as_long_as_the_emulator_is_told(
        hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "cmv-" + label
    _sas_enrollment(hsm, emu, reg, label)
    emu.issued_validity = 20
    Provisioner(hsm, tmp_path).register(_req(reg, label, emulator_pki, issue_cert=label + "-op"), timeout=30)
    leaf = hsm.certificate_chain(label + "-op")[0]
    # not_before is backdated a minute for clock skew; the lifetime is what was configured after it
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == pytest.approx(80, abs=2)


def test_a_leaf_csr_with_a_weak_key_is_refused_by_dps_with_a_clear_error(
        hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "cmw-" + label
    _sas_enrollment(hsm, emu, reg, label)
    weak = _csr(rsa.generate_private_key(65537, 1024), reg)
    with pytest.raises(CertificateRefused, match=r"refused the certificate signing request.*too weak"):
        Provisioner(hsm, tmp_path).register(_req(reg, label, emulator_pki, csr=weak), timeout=30)
    assert [r.status_code for r in emu.received.registrations if r.registration_id == reg] == [400]


@pytest.mark.parametrize(("curve", "cn_suffix", "says"), [
    (ec.SECP384R1, "-other", "must equal the registration id"),
    (ec.SECP192R1, "", "curve secp192r1 is not allowed"),
])
def test_dps_refuses_a_csr_with_400_and_an_error_body(
        hsm, emu, emulator_pki, label, curve, cn_suffix, says) -> None:  # type: ignore[no-untyped-def]
    """At the protocol level: the provisioner would not send a CSR for another id (next test)."""
    reg = "cmn-" + label
    _sas_enrollment(hsm, emu, reg, label)
    target = Provisioner(hsm, "/nonexistent")._target(_req(reg, label, emulator_pki), label, None)
    with pytest.raises(dps_client.Rejected) as info:
        dps_client.register(target, None, 30, _csr(ec.generate_private_key(curve()), reg + cn_suffix))
    assert info.value.status == 400
    assert info.value.body["errorCode"] == 400004 and says in info.value.body["message"]


def test_the_provisioner_refuses_a_leaf_csr_for_another_id_before_connecting(
        hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "cml-" + label
    _sas_enrollment(hsm, emu, reg, label)
    n = len(emu.received.connects)
    with pytest.raises(InvalidInput, match="CN must be the registration id"):
        Provisioner(hsm, tmp_path).register(
            _req(reg, label, emulator_pki, csr=_csr(ec.generate_private_key(ec.SECP256R1()), "someone-else")))
    assert len(emu.received.connects) == n


def test_a_chain_for_another_key_is_not_accepted(emulator_pki) -> None:  # type: ignore[no-untyped-def]
    from emulator.pki import make_device_cert

    issued = make_device_cert(emulator_pki.intermediate, "dev-x")
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    chain = [issued.cert, emulator_pki.intermediate.cert]
    issued_id.check_chain(chain, issued.key.public_key(), "dev-x")
    with pytest.raises(issued_id.IssuedChainInvalid, match="not for the requested key"):
        issued_id.check_chain(chain, other, "dev-x")
    with pytest.raises(issued_id.IssuedChainInvalid, match="is not the registration id"):
        issued_id.check_chain(chain, issued.key.public_key(), "dev-y")
    ca = emulator_pki.intermediate
    with pytest.raises(issued_id.IssuedChainInvalid, match="a CA certificate, not a device's"):
        issued_id.check_chain([ca.cert, emulator_pki.root.cert], ca.key.public_key(), x509_id.common_name(ca.cert))


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
def test_register_command_issues_a_certificate_and_prints_it(cli, hsm, emu, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    reg = "cmc-" + label
    _sas_enrollment(hsm, emu, reg, label)
    res = cli("register", "--id-scope", SCOPE, "--registration-id", reg, "--sas-key", label,
              "--provisioning-host", HOST, "--server-ca", str(emulator_pki.ca_file), "--issue-cert", label + "-op")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["status"] == "assigned" and out["certificate"]["label"] == label + "-op"
    assert out["certificate"]["subject"] == f"CN={reg}"
    assert out["certificate"]["issuer"] == "CN=Emulator DPS Issuing CA"
    leaf = hsm.certificate_chain(label + "-op")[0]
    assert out["certificate"]["notAfter"] == times.iso(leaf.not_valid_after_utc)  # "...Z", one format


def test_register_command_reports_a_refused_csr_with_its_exit_code(
        cli, hsm, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "cmk-" + label
    _sas_enrollment(hsm, emu, reg, label)
    # An operational key DPS will not certify: RSA-1024, imported under the label beforehand.
    p12 = pkcs12.serialize_key_and_certificates(b"weak", rsa.generate_private_key(65537, 1024), None, None,
                                                serialization.NoEncryption())
    (tmp_path / "weak.p12").write_bytes(p12)
    assert cli("key", "import-pkcs12", str(tmp_path / "weak.p12"), "--label", label + "-op",
               "--no-password").code == 0
    res = cli("register", "--id-scope", SCOPE, "--registration-id", reg, "--sas-key", label,
              "--provisioning-host", HOST, "--server-ca", str(emulator_pki.ca_file), "--issue-cert", label + "-op")
    assert res.code == 1, res.err
    assert "refused the certificate signing request" in res.err and "too weak" in res.err
    assert "Traceback" not in res.err


@pytest.mark.token_matrix
@needs(HMAC_IMPORT)
def test_serve_onboards_with_its_key_and_connects_to_the_hub_with_the_issued_certificate(
        hsm, token_env, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = "cms-" + label
    _sas_enrollment(hsm, emu, reg, label)
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"hsm:\n  module: {token_env.module}\n  token_label: {token_env.label}\n  pin_file: {token_env.pin_file}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"cloud:\n  id_scope: {SCOPE}\n  registration_id: {reg}\n  provisioning_host: {HOST}\n"
        f"  attestation: symmetricKey\n  key: {label}\n  issue_cert: {label}-op\n"
        f"  server_ca_file: {emulator_pki.ca_file}\n")
    proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "serve"],
                            env=token_env.env(SPYRUS_HSM_CONFIG=str(config)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        emu.wait_for(lambda: any(c.client_id == reg and c.service == "hub" and c.accepted
                                 for c in emu.received.connects), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    hub = [c for c in emu.received.connects if c.client_id == reg and c.service == "hub" and c.accepted]
    assert [c.auth_method for c in hub] == ["x509"]  # the operational certificate, not the SAS key
    assert [c.username.split("/")[0] for c in emu.received.connects
            if c.client_id == reg and c.service == "dps"] == [SCOPE]
    assert _private_key_files(tmp_path) == []


@pytest.mark.token_matrix
def test_x509_onboarding_gets_a_certificate_issued_for_a_token_key_and_renews_it_with_a_new_one(
        hsm, provider, emu, emulator_pki, label, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What a TPM-equipped gateway does (no HMAC key needed): X.509 attestation with a key made in
    the token, DPS issues an operational certificate for another key made there (P-384), and a
    renewal replaces it with a third key and certificate, the old generation deleted."""
    from service_harness import certify_hsm_key

    from spyrus_hsm.cloud import renewal

    reg = "cmx-" + label
    certify_hsm_key(hsm, label, reg, emulator_pki.intermediate)
    emu.add_individual_enrollment(reg, x509_ca_pem=emulator_pki.root.cert_pem, assigned_hub=HOST)
    base = label + "-op"
    request = DpsRequest(id_scope=SCOPE, registration_id=reg, provisioning_host=HOST, attestation="x509",
                         key=label, server_ca_pem=emulator_pki.ca_pem, issue_cert=base)
    provisioner = Provisioner(hsm, tmp_path)
    a = provisioner.register(request, timeout=30)
    first = renewal.require_current(hsm, base)
    assert a.status == "assigned" and first.leaf.subject.rfc4514_string() == f"CN={reg}"
    assert hsm.key_algorithm(first.label) is KeyAlgorithm.EC_P384
    moved: list[str] = []
    renewed = renewal.renew_once(hsm, provisioner, request, base, lambda cred, _: moved.append(cred.label),
                                 timeout=30, in_use=first)
    assert moved == [renewed.credential.label] and renewed.credential.label != first.label
    assert renewed.credential.leaf.public_key() != first.leaf.public_key()
    assert [g.label for g in renewal.generations(hsm, base)] == [renewed.credential.label]
