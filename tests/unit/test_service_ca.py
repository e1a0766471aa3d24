"""What the API demands of the service certificate before it certifies short-lived TLS keys with
it (identity/service_ca.review), and what `serve` and `selftest` make of each answer:

- no CA certificate at all: the `hsm` placement (a warning: every handshake costs a signature);
- a CA certificate that would make docs/security/api-tls.md's security argument false (its key
  could certify a CA, or keys for other uses or other names, or it lives too short for leaves
  whose clocks are a day off): `serve` refuses it saying what to re-issue, `selftest` FAILs;
- a profile some leaf TLS stacks cannot verify (critical nameConstraints: mbedTLS 2.28;
  nameConstraints with IP addresses: wolfSSL 5.5): a warning.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spyrus_hsm.config import service_section
from spyrus_hsm.identity.service_ca import BACKDATE, review
from spyrus_hsm.selftest import _issuing_check
from spyrus_hsm.service.api_tls import ServerTls, TlsSetupError

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
KEY = ec.generate_private_key(ec.SECP256R1())
SAN = x509.SubjectAlternativeName([x509.DNSName("edge-gw.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.5"))])
DNS_SAN = x509.SubjectAlternativeName([x509.DNSName("edge-gw.example")])
KEY_CERT_SIGN = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                              encipher_only=False, decipher_only=False)
SERVER_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])


def service_ca(*, ca: bool = True, path_length: int | None = 0, usage: x509.KeyUsage | None = KEY_CERT_SIGN,
               eku: x509.ExtendedKeyUsage | None = SERVER_AUTH, san: x509.SubjectAlternativeName | None = SAN,
               constraints: x509.NameConstraints | None = None, critical_constraints: bool = False,
               valid: tuple[dt.timedelta, dt.timedelta] = (-DAY, 30 * DAY)) -> x509.Certificate:
    """A service certificate of the recommended profile (docs/security/api-tls.md), or one that
    differs from it where an argument says so."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-gw service")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(KEY.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW + valid[0]).not_valid_after(NOW + valid[1])
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True))
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(eku, critical=False)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=critical_constraints)
    return builder.sign(KEY, hashes.SHA256())


def dns(*names: str) -> list[x509.GeneralName]:
    return [x509.DNSName(n) for n in names]


def test_the_recommended_profile_is_accepted_without_a_warning() -> None:
    found = review(service_ca(), NOW)
    assert found.usable and found.not_issuing is None and found.refused == () and found.warnings == ()
    check = _issuing_check("api", service_ca(), 259200, NOW)
    assert check.ok and not check.warning and "no token signature per handshake" in check.detail


def test_a_certificate_that_is_no_ca_s_is_the_hsm_placement_not_a_refusal() -> None:
    found = review(service_ca(ca=False), NOW)
    assert found.not_issuing is not None and "not a CA" in found.not_issuing
    assert found.refused == () and not found.usable
    check = _issuing_check("api", service_ca(ca=False), 259200, NOW)
    assert check.ok and check.warning and "token signature" in check.detail and "path-length-0 CA" in check.detail


def test_keyusage_may_be_absent() -> None:  # RFC 5280: no keyUsage, no restriction on it
    assert review(service_ca(usage=None), NOW).usable


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "path length absent": ({"path_length": None}, "path length is absent"),
    "path length 1": ({"path_length": 1}, "path length is 1"),
    "keyUsage without keyCertSign": ({"usage": x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=True, encipher_only=False, decipher_only=False)},
        "keyCertSign"),
    "no extendedKeyUsage": ({"eku": None}, "no extendedKeyUsage"),
    "anyExtendedKeyUsage": ({"eku": x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                           ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])},
                            "allows anyExtendedKeyUsage"),
    "clientAuth": ({"eku": x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])},
                   "allows clientAuth"),
    "clientAuth only": ({"eku": x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])}, "allows clientAuth"),
    "no subjectAltName": ({"san": None}, "names no host"),
    "an email address only": ({"san": x509.SubjectAlternativeName([x509.RFC822Name("ops@example.com")])},
                              "names no host"),
    "not valid yet": ({"valid": (DAY, 30 * DAY)}, "not valid until 2026-12-05T12:00:00Z"),
    "expired": ({"valid": (-30 * DAY, -DAY)}, "expired at 2026-12-03T12:00:00Z"),
    "less life left than the backdate": ({"valid": (-DAY, BACKDATE - dt.timedelta(minutes=1))},
                                         "less than 24 h from now"),
    "nameConstraints not permitting its DNS name": (
        {"constraints": x509.NameConstraints(dns("other.example"), None), "san": DNS_SAN},
        "do not permit its own name(s) edge-gw.example"),
    "nameConstraints excluding its DNS name": (
        {"constraints": x509.NameConstraints(None, dns("edge-gw.example")), "san": DNS_SAN},
        "do not permit its own name(s) edge-gw.example"),
    "nameConstraints with a leading dot, which permits subdomains only": (
        {"constraints": x509.NameConstraints(dns(".edge-gw.example"), None), "san": DNS_SAN},
        "do not permit its own name(s) edge-gw.example"),
    "nameConstraints whose IP subtree leaves out its address": (
        {"constraints": x509.NameConstraints([x509.IPAddress(ipaddress.ip_network("10.0.1.0/24"))], None)},
        "do not permit its own name(s) 10.0.0.5"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_ca_certificate_that_breaks_the_security_argument_is_refused_and_fails_selftest(case: str) -> None:
    changes, expected = REFUSED[case]
    cert = service_ca(**changes)
    found = review(cert, NOW)
    assert found.not_issuing is None and not found.usable
    assert any(expected in why for why in found.refused), found.refused
    check = _issuing_check("api", cert, 259200, NOW)
    assert not check.ok and expected in check.detail and "Re-issue it" in check.detail, check


def test_life_left_just_above_the_backdate_is_enough() -> None:
    assert review(service_ca(valid=(-DAY, BACKDATE + dt.timedelta(minutes=1))), NOW).usable
    assert BACKDATE == dt.timedelta(hours=24)


PERMITTED: dict[str, tuple[x509.NameConstraints, bool, x509.SubjectAlternativeName, list[str]]] = {
    "non-critical, DNS only, DNS names only": (
        x509.NameConstraints(dns("edge-gw.example"), None), False, DNS_SAN, []),
    "a parent domain permits a subdomain": (
        x509.NameConstraints(dns("example"), None), False, DNS_SAN, []),
    "critical": (
        x509.NameConstraints(dns("edge-gw.example"), None), True, DNS_SAN, ["mbedTLS 2.28"]),
    "an IP subtree": (
        x509.NameConstraints([*dns("edge-gw.example"), x509.IPAddress(ipaddress.ip_network("10.0.0.5/32"))], None),
        False, SAN, ["wolfSSL 5.5"]),
    "an IP address in subjectAltName under DNS-only constraints": (
        x509.NameConstraints(dns("edge-gw.example"), None), False, SAN, ["wolfSSL 5.5"]),
    "critical, with an IP subtree (what the development PKI made before)": (
        x509.NameConstraints([x509.IPAddress(ipaddress.ip_network("10.0.0.5/32"))], None), True,
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("10.0.0.5"))]),
        ["mbedTLS 2.28", "wolfSSL 5.5"]),
}


@pytest.mark.parametrize("case", PERMITTED, ids=list(PERMITTED))
def test_name_constraints_that_permit_every_name_are_accepted_with_a_warning_for_the_leaves_they_shut_out(
        case: str) -> None:
    constraints, critical, san, stacks = PERMITTED[case]
    cert = service_ca(constraints=constraints, critical_constraints=critical, san=san)
    found = review(cert, NOW)
    assert found.usable, found.refused
    assert len(found.warnings) == len(stacks) and all(any(s in w for w in found.warnings) for s in stacks), found
    check = _issuing_check("api", cert, 259200, NOW)
    assert check.ok and check.warning == bool(stacks), check
    assert all(s in check.detail for s in stacks)


def test_serve_refuses_a_ca_certificate_that_breaks_the_argument_saying_what_to_re_issue(tmp_path: Path) -> None:
    cert = service_ca(eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                      valid=(-DAY, 3650 * DAY))
    chain = tmp_path / "service.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cfg = service_section({"tls_key_label": "api", "tls_cert_file": str(chain), "policy": []}, "test")
    hsm: Any = SimpleNamespace(state=SimpleNamespace(recoveries=0))  # refused before the token is asked anything
    hsm.member_for = lambda key: hsm  # one token: multi-step work stays on it
    with pytest.raises(TlsSetupError) as raised:
        ServerTls(cfg, hsm, tmp_path / "tls", clock=lambda: NOW.timestamp())
    message = str(raised.value)
    assert "will not certify with" in message and "allows clientAuth" in message
    assert "Re-issue it with basicConstraints CA and path length 0" in message
    assert "extendedKeyUsage serverAuth only" in message
