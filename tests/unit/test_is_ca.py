"""One rule for "is this a CA's certificate": basicConstraints with cA true. service/auth used to
count a self-signed certificate without basicConstraints as a CA (trusting it as an anchor and
refusing it as a leaf for being one); identity/issued did not. Both now use identity.x509.is_ca."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spyrus_hsm.identity.x509 import is_ca
from spyrus_hsm.service.auth import ClientCertVerifier
from spyrus_hsm.service.problems import Problem

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)


def _cert(cn: str, key: ec.EllipticCurvePrivateKey, *, ca: bool | None,
          issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer[0].subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=1)))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if issuer is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(("ca", "expected"), [(True, True), (False, False), (None, False)],
                         ids=["cA true", "cA false", "no basicConstraints"])
def test_only_basic_constraints_with_ca_true_makes_a_ca(ca: bool | None, expected: bool) -> None:
    assert is_ca(_cert("root", _key(), ca=ca)) is expected


def test_a_self_signed_certificate_without_basic_constraints_is_not_a_ca() -> None:
    cert = _cert("old-style-root", _key(), ca=None)
    assert cert.subject == cert.issuer  # the case the two rules disagreed on
    assert not is_ca(cert)


def test_a_client_certificate_from_an_anchor_without_basic_constraints_is_refused() -> None:
    """Failed before the single rule: the verifier accepted this leaf (auth counted the anchor,
    self-signed without basicConstraints, as a CA)."""
    anchor_key = _key()
    anchor = _cert("no-constraints", anchor_key, ca=None)
    leaf = _cert("leaf-1", _key(), ca=False, issuer=(anchor, anchor_key))
    with pytest.raises(Problem) as refused:
        ClientCertVerifier([anchor]).verify(leaf.public_bytes(serialization.Encoding.DER), now=NOW)
    assert refused.value.status == 401
    assert "not issued by a CA this service trusts" in refused.value.detail


def test_a_client_certificate_from_a_ca_anchor_is_accepted() -> None:
    anchor_key = _key()
    anchor = _cert("ca", anchor_key, ca=True)
    leaf = _cert("leaf-1", _key(), ca=False, issuer=(anchor, anchor_key))
    assert ClientCertVerifier([anchor]).verify(leaf.public_bytes(serialization.Encoding.DER), now=NOW) == "leaf-1"
