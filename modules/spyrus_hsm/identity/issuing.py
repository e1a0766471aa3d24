"""Short-lived TLS server credentials certified by a key in the HSM.

The API's certificate authority is the service key in the HSM (`service.tls_key_label`), whose
certificate is an issuing one (basicConstraints cA, path length 0, ideally name-constrained to
the service's names). It certifies a key pair made in memory for the TLS handshakes, valid for a
short time, with the service certificate's names; so a handshake costs no token signature, and
the token signs once per lifetime instead of once per connection. The private key is never
written anywhere.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from asn1crypto import x509 as asn1x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import Kind, SpyrusError
from ..hsm import Hsm, KeyAlgorithm
from . import hsm_signature
from .x509 import is_ca

BACKDATE = dt.timedelta(minutes=5)  # clock skew between this device and its leaves


class IssuingError(SpyrusError, kind=Kind.CREDENTIAL):
    """The service key could not certify a short-lived key (its certificate is not its key's)."""


def cannot_issue(cert: x509.Certificate) -> str | None:
    """Why `cert` cannot certify the API's short-lived keys, or None when it can."""
    if not is_ca(cert):
        return "it is not a CA certificate (basicConstraints cA is not set)"
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        return "its key usage does not include keyCertSign"
    if not server_names(cert):
        return "it names no host (no subjectAltName)"
    return None


def server_names(cert: x509.Certificate) -> list[x509.GeneralName]:
    """The DNS names and IP addresses the service answers to, as its certificate lists them."""
    san = _extension(cert, x509.SubjectAlternativeName)
    if san is None:
        return []
    return [name for name in san if isinstance(name, x509.DNSName | x509.IPAddress)]


def issue(hsm: Hsm, label: str, chain: list[x509.Certificate], lifetime: dt.timedelta,
          now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
    """A new P-256 key pair in memory and its chain: a certificate for the service's names
    signed by the HSM key `label`, then `chain` (the HSM key's certificate and its issuers).
    Blocking (two HSM calls, each bounded by the pool): call it off the event loop."""
    issuer = chain[0]
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + lifetime, issuer.not_valid_after_utc)
    issuer_cn = [a.value for a in issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    cn = f"{issuer_cn[0] if issuer_cn and isinstance(issuer_cn[0], str) else 'spyrus-hsm service'} (TLS)"
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(issuer.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE).not_valid_after(not_after)
               .add_extension(x509.SubjectAlternativeName(server_names(issuer)), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(_authority_key_id(issuer), critical=False))
    algorithm = hsm.key_algorithm(label)
    cert = _signed_in_hsm(hsm, label, algorithm, builder)
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise IssuingError(f"the certificate stored beside HSM key '{label}' is not that key's: "
                           "a certificate it signed does not verify against it") from None
    return key, [cert, *chain]


def _signed_in_hsm(hsm: Hsm, label: str, algorithm: KeyAlgorithm,
                   builder: x509.CertificateBuilder) -> x509.Certificate:
    # cryptography signs only with keys it holds: a draft signed by a throwaway key of the same
    # type carries the right signature algorithm in its to-be-signed part, which the HSM signs.
    _, _, digest = hsm_signature.scheme(algorithm)
    throwaway: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if algorithm is KeyAlgorithm.EC_P384:
        throwaway = ec.generate_private_key(ec.SECP384R1())
    elif algorithm is KeyAlgorithm.EC_P256:
        throwaway = ec.generate_private_key(ec.SECP256R1())
    else:
        throwaway = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    draft = builder.sign(throwaway, hashes.SHA384() if digest == "sha384" else hashes.SHA256())
    name, signature = hsm_signature.sign(hsm, label, algorithm, draft.tbs_certificate_bytes)
    der = asn1x509.Certificate({
        "tbs_certificate": asn1x509.TbsCertificate.load(draft.tbs_certificate_bytes),
        "signature_algorithm": {"algorithm": name},
        "signature_value": signature,
    }).dump()
    return x509.load_der_x509_certificate(der)


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = _extension(issuer, x509.SubjectKeyIdentifier)
    if ski is not None:
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


def _extension(cert: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
