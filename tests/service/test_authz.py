"""Who may do what, over real HTTPS with the session's SoftHSM token: authentication failures are
401 with a problem type naming the reason, policy refusals 403, and every decision is audited
once, without a secret in the audit log or the logs."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from service_harness import Leaf, ServiceHarness, new_leaf, other_ca_leaf, problem_type, verify_sas

from emulator.pki import EmulatorPki, PemFiles
from spyrus_hsm.hsm import Hsm, Secret

OWN_DEVICE = {"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}
# Caller-named HMAC signing needs the device keys in a namespace of their own (service/keyroles.py)
SIGNING: dict[str, Any] = {"signing_keys": ("sign-*",), "sas_key": "sas-{deviceId}", "dps_key": "dps-{registrationId}"}
GATEWAYS = {"principals": ["gateway-*"], "operations": ["sas-token"], "devices": ["line3-*"]}


@dataclass
class Site:
    """One running service and the parties of the matrix, by role: 'leaf' (a device acting for
    itself), 'other' (another device), 'gateway' (matches the GATEWAYS rule), 'line3' and 'line4'
    (devices the gateway may and may not serve)."""
    svc: ServiceHarness
    parties: dict[str, Leaf]
    certs: dict[str, PemFiles]

    def credentials(self, kind: str | None, who: str) -> dict[str, Any]:
        if kind is None:
            return {}
        if kind == "bearer":
            return {"bearer": self.parties[who].bearer}
        if kind == "wrong bearer":
            return {"bearer": secrets.token_urlsafe(24)}
        return {"cert": self.certs[f"{kind}:{who}"]}


@pytest.fixture(scope="module")
def site(hsm: Hsm, emulator_pki: EmulatorPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    parties = {role: new_leaf(hsm, role) for role in ("leaf", "other", "gateway", "line3", "line4")}
    leaf, gateway = parties["leaf"], parties["gateway"]
    now = dt.datetime.now(dt.UTC)
    certs = {
        "certificate:leaf": emulator_pki.device(leaf.name),
        "certificate:gateway": emulator_pki.device(gateway.name),
        "another CA's certificate:leaf": other_ca_leaf(emulator_pki, leaf.name),
        "expired certificate:leaf": emulator_pki.device(leaf.name, not_before=now - dt.timedelta(days=10),
                                                        not_after=now - dt.timedelta(days=1)),
    }
    bearer = {p.name: p.bearer for p in (leaf, gateway)}
    with ServiceHarness(hsm, tmp_path_factory.mktemp("authz"), emulator_pki, policy=[OWN_DEVICE, GATEWAYS],
                        bearer=bearer) as svc:
        yield Site(svc, parties, certs)


MATRIX = [
    # credentials presented,             by,        for device, status, problem type,    detail mentions
    pytest.param(None, "leaf", "leaf", 401, "unauthenticated", "client certificate", id="no credentials"),
    pytest.param("another CA's certificate", "leaf", "leaf", 401, "certificate-rejected", "not issued by a CA",
                 id="certificate from another CA"),
    pytest.param("expired certificate", "leaf", "leaf", 401, "certificate-rejected", "expired",
                 id="expired certificate"),
    pytest.param("certificate", "leaf", "other", 403, "forbidden", "no policy rule allows",
                 id="valid certificate asking for another device"),
    pytest.param("wrong bearer", "leaf", "leaf", 401, "invalid-token", "not recognised", id="wrong bearer token"),
    pytest.param("bearer", "leaf", "leaf", 200, None, None, id="bearer token for its own device"),
    pytest.param("certificate", "leaf", "leaf", 200, None, None, id="certificate for its own device"),
    pytest.param("bearer", "leaf", "line3", 403, "forbidden", "no policy rule allows",
                 id="bearer token asking for a gateway's device"),
    pytest.param("certificate", "gateway", "line3", 200, None, None, id="wildcard rule, matching device"),
    pytest.param("bearer", "gateway", "line3", 200, None, None, id="wildcard rule by bearer, matching device"),
    pytest.param("certificate", "gateway", "line4", 403, "forbidden", "no policy rule allows",
                 id="wildcard rule, device it does not match"),
]


@pytest.mark.parametrize("credentials, by, device, status, kind, detail", MATRIX)
def test_authorization_matrix(site: Site, credentials: str | None, by: str, device: str, status: int,
                              kind: str | None, detail: str | None) -> None:
    target = site.parties[device]
    code, headers, body = site.svc.call("POST", "/v1/sas-tokens", {"deviceId": target.name},
                                        **site.credentials(credentials, by))
    assert code == status, body
    if kind is None:
        fields = verify_sas(body["token"], target.key)
        assert fields["sr"] == f"hub.example/devices/{target.name}"
    else:
        assert problem_type(headers, body) == kind
        assert detail is not None and detail in body["detail"]
        assert "token" not in body


# --- which key signs ---------------------------------------------------------------------------


def test_a_signature_needs_a_rule_whose_keys_match_the_key_named(hsm: Hsm, tmp_path: Path,
                                                                 emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    no_keys = {"principals": ["*"], "operations": ["sas-token", "signature"], "devices": ["{cn}"]}
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[no_keys], bearer={leaf.name: leaf.bearer}) as svc:
        status, headers, body = svc.call("POST", "/v1/signatures", _hmac_request(leaf.name, b"x"),
                                         bearer=leaf.bearer)
    assert status == 403 and problem_type(headers, body) == "forbidden"
    assert f"key '{leaf.name}'" in body["detail"]


def test_a_keys_rule_lets_the_caller_sign_with_the_key_it_names(hsm: Hsm, tmp_path: Path,
                                                                emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    signing_key = secrets.token_bytes(32)
    hsm.import_secret_key(f"sign-{leaf.name}", Secret(signing_key))
    own_key = {"principals": ["*"], "operations": ["signature"], "keys": ["sign-{cn}"]}
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[own_key], bearer={leaf.name: leaf.bearer},
                        **SIGNING) as svc:
        status, _, body = svc.call("POST", "/v1/signatures", _hmac_request(f"sign-{leaf.name}", b"to be signed"),
                                   bearer=leaf.bearer)
    assert status == 200, body
    assert base64.b64decode(body["signature"]) == hmac.new(signing_key, b"to be signed", hashlib.sha256).digest()


def test_es384_signs_with_a_p384_key_the_caller_may_name(hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from spyrus_hsm.hsm import KeyAlgorithm
    from spyrus_hsm.hsm.encoding import ecdsa_raw_to_der

    leaf = new_leaf(hsm)
    hsm.generate_keypair(leaf.name + "-p384", KeyAlgorithm.EC_P384)
    own_key = {"principals": ["*"], "operations": ["signature"], "keys": ["{cn}-p384"]}
    request = {"key": leaf.name + "-p384", "algorithm": "ES384", "data": base64.b64encode(b"jws input").decode()}
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[own_key], bearer={leaf.name: leaf.bearer},
                        signing_keys=("*-p384",)) as svc:
        status, _, body = svc.call("POST", "/v1/signatures", request, bearer=leaf.bearer)
    assert status == 200, body
    raw = base64.b64decode(body["signature"])
    assert len(raw) == 96  # JWS ES384: r||s, 48 bytes each
    public = hsm.public_key(leaf.name + "-p384")
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(ecdsa_raw_to_der(raw), b"jws input", ec.ECDSA(hashes.SHA384()))


def test_a_sas_token_is_signed_with_the_key_the_service_chooses(hsm: Hsm, tmp_path: Path,
                                                                emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    primary = secrets.token_bytes(32)
    hsm.import_secret_key(f"{leaf.name}-primary", Secret(primary))
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        sas_key="{deviceId}-primary") as svc:
        status, _, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer)
    assert status == 200, body
    verify_sas(body["token"], primary)  # not leaf.key, the key that carries the device's own name


def _hmac_request(key: str, data: bytes) -> dict[str, str]:
    return {"key": key, "algorithm": "HMAC-SHA256", "data": base64.b64encode(data).decode()}


# --- audit -------------------------------------------------------------------------------------


def test_every_decision_is_audited_once_and_no_secret_is_written(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    leaf, other = new_leaf(hsm), new_leaf(hsm, "other")
    for who in (leaf, other):
        hsm.import_secret_key(f"sas-{who.name}", Secret(who.key))
    hsm.import_secret_key(f"sign-{leaf.name}", Secret(secrets.token_bytes(32)))
    wrong_bearer = secrets.token_urlsafe(24)
    policy = [OWN_DEVICE, {"principals": ["*"], "operations": ["signature"], "keys": ["sign-{cn}"]}]
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=policy, bearer={leaf.name: leaf.bearer},
                        **SIGNING) as svc:
        answers = [
            svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer),
            svc.call("POST", "/v1/signatures", _hmac_request(f"sign-{leaf.name}", b"audit me"), bearer=leaf.bearer),
            svc.call("POST", "/v1/sas-tokens", {"deviceId": other.name}, bearer=leaf.bearer),
            svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=wrong_bearer),
            svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, cert=emulator_pki.device(leaf.name)),
        ]
        records = svc.audit_records()
        audit_text = svc.audit_file.read_text()
    assert [a[0] for a in answers] == [200, 200, 403, 401, 200]
    assert [(r["principal"], r["operation"], r["device"], r["key"], r["outcome"]) for r in records] == [
        (leaf.name, "sas-token", leaf.name, f"sas-{leaf.name}", "allowed"),
        (leaf.name, "signature", None, f"sign-{leaf.name}", "allowed"),
        (leaf.name, "sas-token", other.name, f"sas-{other.name}", "denied"),
        (None, "sas-token", None, None, "unauthenticated"),
        (leaf.name, "sas-token", leaf.name, f"sas-{leaf.name}", "allowed"),
    ]
    token, signature = answers[0][2]["token"], answers[1][2]["signature"]
    secret_texts = {
        "token": token, "token signature": token.split("sig=")[1].split("&")[0],
        "signature": signature, "bearer": leaf.bearer, "wrong bearer": wrong_bearer,
        "device key": base64.b64encode(leaf.key).decode(),
    }
    for what, value in secret_texts.items():
        assert value not in audit_text, f"the {what} is in the audit log"
        assert value not in caplog.text, f"the {what} is in the logs"
