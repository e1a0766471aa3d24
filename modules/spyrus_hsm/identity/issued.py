"""Certificate requests for DPS certificate issuance and the checks on what comes back.

A CSR sent to DPS (made in the HSM for a key there, or handed in by a leaf for its own key) is
checked here before it leaves: it must parse, its self-signature must verify, and its subject CN
must equal the registration id (DPS refuses it otherwise, later and less clearly). The chain DPS
answers with (`issuedCertificateChain`, base64 DER, leaf first) is checked before anything uses
or stores it: the leaf carries the requested public key and the registration id as CN, each
certificate is signed by the next and valid now, the leaf is an end entity fit for TLS client
authentication, the others are CAs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from .. import times
from ..errors import Kind, SpyrusError
from ..hsm import InvalidInput, KeyAlgorithm
from ..keystore import KeyStore
from . import x509 as x509_id
from .csr import build_csr

OPERATIONAL_KEY = KeyAlgorithm.EC_P384  # as the CAs of Azure Device Registry


class IssuedChainInvalid(SpyrusError, kind=Kind.UPSTREAM):
    """DPS answered with a certificate chain that must not be used; the message says why."""

    public_detail = "DPS issued a certificate chain that cannot be used"


def operational_key(hsm: KeyStore, label: str) -> str:
    """The CKA_ID (hex) of the key pair `label`, generated in the HSM (P-384) if absent."""
    found = hsm.find(label, "private")
    if len(found) > 1:
        raise InvalidInput(f"{len(found)} private keys are labelled '{label}'; delete the extra ones")
    return found[0].id_hex if found else hsm.generate_keypair(label, OPERATIONAL_KEY)


def device_csr(hsm: KeyStore, label: str, registration_id: str) -> bytes:
    """A DER CSR for the key pair `label` with CN = the registration id, signed in the HSM."""
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, registration_id)])
    return build_csr(hsm, label, subject.rfc4514_string())


def check_csr(der: bytes, registration_id: str) -> x509.CertificateSigningRequest:
    """A leaf's CSR, if it is one DPS could sign for `registration_id` (InvalidInput otherwise)."""
    try:
        csr = x509.load_der_x509_csr(der)
        signed = csr.is_signature_valid
    except ValueError as exc:
        raise _about_the_csr(f"'csr' is not a DER PKCS#10 certificate signing request ({exc})") from None
    if not signed:
        raise _about_the_csr("the CSR's signature does not verify with its public key")
    names = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(names[0].value) if len(names) == 1 else None
    if cn != registration_id:
        raise _about_the_csr(f"the CSR's subject CN must be the registration id '{registration_id}', not {cn!r}")
    return csr


def _about_the_csr(message: str) -> InvalidInput:
    """The caller's own CSR is at fault: the caller may be told why."""
    return InvalidInput(message, public=message)


def decode_chain(encoded: Any) -> list[x509.Certificate]:
    """`issuedCertificateChain` as certificates, leaf first."""
    if not isinstance(encoded, list) or not encoded or not all(isinstance(c, str) for c in encoded):
        raise IssuedChainInvalid("DPS answered without an issuedCertificateChain (a list of base64 "
                                 "DER certificates); is the enrollment linked to a certificate policy?")
    try:
        return [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in encoded]
    except (ValueError, binascii.Error) as exc:
        raise IssuedChainInvalid(f"DPS's issuedCertificateChain does not parse: {exc}") from None


def check_chain(chain: list[x509.Certificate], public_key: PublicKeyTypes, registration_id: str,
                now: dt.datetime | None = None) -> None:
    """Raise IssuedChainInvalid unless `chain` is fit to use as the credential of `public_key`."""
    leaf = chain[0]
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*fmt) != public_key.public_bytes(*fmt):
        raise IssuedChainInvalid("the issued certificate is not for the requested key")
    if x509_id.common_name(leaf) != registration_id:
        raise IssuedChainInvalid(f"the issued certificate's CN '{x509_id.common_name(leaf)}' is not "
                                 f"the registration id '{registration_id}'")
    try:
        x509_id.validate_chain(chain, now=now)
    except x509_id.ChainError as exc:
        raise IssuedChainInvalid(f"the issued chain is unusable: {exc}") from None
    if x509_id.is_ca(leaf):
        raise IssuedChainInvalid("the issued certificate is a CA certificate, not a device's")
    usage = x509_id.extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise IssuedChainInvalid("the issued certificate's key usage does not allow digital signatures")
    purposes = x509_id.extension(leaf, x509.ExtendedKeyUsage)
    if purposes is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in purposes:
        raise IssuedChainInvalid("the issued certificate is not valid for TLS client authentication")
    for ca in chain[1:]:
        if not x509_id.is_ca(ca):
            raise IssuedChainInvalid(f"'{ca.subject.rfc4514_string()}' in the issued chain is not a CA")


def describe(cert: x509.Certificate) -> dict[str, str]:
    """What the CLI and the API show of an issued certificate."""
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "notAfter": times.iso(cert.not_valid_after_utc)}
