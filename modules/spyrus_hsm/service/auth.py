"""Who is calling: a leaf certificate chaining to the configured CA (principal = its CN), or a
bearer token whose SHA-256 is configured (principal = the name it is configured under).

The TLS handshake accepts any client certificate (see identity.tls.defer_client_verification)
so that a bad one gets a 401 that says what is wrong; nothing is trusted until `verify` below
has checked issuer signature, validity period, CA flags and key usage.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import times
from ..identity.x509 import is_ca
from .problems import Problem, unauthenticated


@dataclass(frozen=True)
class Principal:
    name: str
    kind: str  # "certificate" | "bearer"


class ClientCertVerifier:
    """Checks a leaf certificate against trust anchors (CAs, or intermediates to trust directly)."""

    def __init__(self, anchors: list[x509.Certificate]) -> None:
        self.anchors = anchors

    @classmethod
    def from_file(cls, path: str) -> ClientCertVerifier:
        try:
            anchors = x509.load_pem_x509_certificates(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"service.client_ca_file {path}: cannot read PEM certificates ({exc})") from None
        return cls(anchors)

    def verify(self, der: bytes, now: dt.datetime | None = None) -> str:
        """The certificate's CN, or Problem 401 saying why it is not accepted."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise _bad_cert("the client certificate cannot be parsed") from None
        now = now or dt.datetime.now(dt.UTC)
        issuer = self._issuer(cert)
        for c, what in ((cert, "the client certificate"), (issuer, "its issuing CA")):
            if now > c.not_valid_after_utc:
                raise _bad_cert(f"{what} expired on {times.iso(c.not_valid_after_utc)}")
            if now < c.not_valid_before_utc:
                raise _bad_cert(f"{what} is not valid before {times.iso(c.not_valid_before_utc)}")
        _check_leaf(cert)
        _check_usage(cert)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = names[0].value if names else ""
        if not isinstance(cn, str) or not cn:
            raise _bad_cert("the client certificate has no common name (CN) to act as")
        return cn

    def _issuer(self, cert: x509.Certificate) -> x509.Certificate:
        for ca in self.anchors:
            if ca.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if not is_ca(ca):
                continue
            return ca
        raise _bad_cert("the client certificate is not issued by a CA this service trusts "
                        f"(issuer '{cert.issuer.rfc4514_string()}')")


def _check_leaf(cert: x509.Certificate) -> None:
    """A CA's certificate authenticates nobody, even one the trusted CA signed: it names an
    issuer, not a device, and its key can mint certificates for any name."""
    if is_ca(cert):
        raise _bad_cert("the client certificate is a CA certificate (basic constraints CA:TRUE), not a leaf")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if usage.key_cert_sign:
        raise _bad_cert("the client certificate's key usage allows signing certificates (keyCertSign): "
                        "it is a CA's, not a leaf's")


def _check_usage(cert: x509.Certificate) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise _bad_cert("the client certificate's extended key usage does not allow client authentication")


def _bad_cert(detail: str) -> Problem:
    return Problem(401, "certificate-rejected", "Client certificate rejected", detail)


class Authenticator:
    def __init__(self, verifier: ClientCertVerifier | None, bearer_sha256: Mapping[str, Sequence[str]]) -> None:
        self.verifier = verifier
        # (principal, digest) pairs: a principal has several while its token is rotated
        self.bearers = [(name, bytes.fromhex(digest)) for name, digests in bearer_sha256.items() for digest in digests]

    def authenticate(self, ssl_object: ssl.SSLObject | None, authorization: str | None) -> Principal:
        from_cert = self._certificate(ssl_object)
        from_bearer = self._bearer(authorization) if authorization is not None else None
        if from_cert and from_bearer and from_cert.name != from_bearer.name:
            raise unauthenticated("the client certificate and the bearer token name different principals")
        principal = from_cert or from_bearer
        if principal is None:
            raise unauthenticated("present a client certificate issued by the configured CA "
                                  "or an 'Authorization: Bearer' token")
        return principal

    def _certificate(self, ssl_object: ssl.SSLObject | None) -> Principal | None:
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None
        if self.verifier is None:
            raise _bad_cert("this service accepts no client certificates")
        return Principal(self.verifier.verify(der), "certificate")

    def _bearer(self, authorization: str) -> Principal:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("the Authorization header must be 'Bearer <token>'")
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, expected in self.bearers:  # compare with every one: no timing hint
            if hmac.compare_digest(digest, expected):
                found = name
        if found is None:
            raise Problem(401, "invalid-token", "Bearer token rejected", "the bearer token is not recognised")
        return Principal(found, "bearer")
