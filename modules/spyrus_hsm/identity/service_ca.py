"""Short-lived TLS server credentials certified by a key in the HSM.

The API's certificate authority is the service key in the HSM (`service.tls_key_label`), whose
certificate is an issuing one (basicConstraints cA with path length 0, keyUsage keyCertSign,
extendedKeyUsage serverAuth only, the service's names in subjectAltName; `review` says what a
certificate lacks). It certifies a key pair made in memory for the TLS handshakes, valid for a
short time, with the service certificate's names; so a handshake costs no token signature, and
the token signs once per lifetime instead of once per connection. The private key is never
written anywhere.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from typing import Any

from asn1crypto import x509 as asn1x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import times
from ..errors import Kind, SpyrusError
from ..hsm import Hsm, KeyAlgorithm
from . import hsm_signature
from .x509 import is_ca

# notBefore of a short-lived certificate is this far back, and a service certificate with less
# life left than this certifies nothing: a leaf whose clock is up to this far behind (or ahead:
# see service.tls_lifetime) still verifies the API's certificate.
BACKDATE = dt.timedelta(hours=24)


class IssuingError(SpyrusError, kind=Kind.CREDENTIAL):
    """The service key could not certify a short-lived key (its certificate is not its key's)."""


@dataclass(frozen=True)
class Review:
    """What the service certificate allows. `not_issuing`: it is no CA's at all (an existing
    deployment's plain server certificate: the `hsm` placement). `refused`: it is a CA's, but
    certifying with it would break the security argument of docs/security/api-tls.md (the API
    must refuse it). `warnings`: it works, but some leaf TLS stacks cannot verify what it signs."""

    not_issuing: str | None = None
    refused: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        return self.not_issuing is None and not self.refused


def review(cert: x509.Certificate, now: dt.datetime) -> Review:
    """`cert`, the service certificate, as the certifier of the API's short-lived keys at `now`."""
    if not is_ca(cert):
        return Review(not_issuing="it is not a CA certificate (basicConstraints cA is not set)")
    refused: list[str] = []
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints.path_length != 0:
        length = "absent" if constraints.path_length is None else f"{constraints.path_length}"
        refused.append(f"its basicConstraints path length is {length}, not 0 (its key could certify another CA)")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        refused.append("its keyUsage does not include keyCertSign")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is None:
        refused.append("it has no extendedKeyUsage (its key could certify keys for any use, "
                       "client authentication included)")
    else:
        others = [_eku_name(oid) for oid in eku if oid != ExtendedKeyUsageOID.SERVER_AUTH]
        if others:
            refused.append(f"its extendedKeyUsage allows {', '.join(others)} besides serverAuth")
        elif ExtendedKeyUsageOID.SERVER_AUTH not in list(eku):
            refused.append("its extendedKeyUsage does not include serverAuth")
    names = server_names(cert)
    if not names:
        refused.append("it names no host (no DNS name or IP address in subjectAltName)")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        refused.append(f"it is not valid until {times.iso(start)} by this device's clock")
    elif now >= end:
        refused.append(f"it expired at {times.iso(end)}")
    elif end - now < BACKDATE:
        refused.append(f"it ends at {times.iso(end)}, less than {_hours(BACKDATE)} from now (what it "
                       f"certifies must stay valid for leaves whose clocks are {_hours(BACKDATE)} ahead)")
    warnings: list[str] = []
    try:
        nc_ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        nc_ext = None
    if nc_ext is not None:
        nc: x509.NameConstraints = nc_ext.value
        outside = [_name_text(n) for n in names if not _permitted(nc, n)]
        if outside:
            refused.append(f"its nameConstraints do not permit its own name(s) {', '.join(outside)}")
        if nc_ext.critical:
            warnings.append("its nameConstraints extension is critical: mbedTLS 2.28 leaves cannot parse it")
        subtrees = [*(nc.permitted_subtrees or []), *(nc.excluded_subtrees or [])]
        if any(isinstance(n, x509.IPAddress) for n in [*subtrees, *names]):
            warnings.append("it has nameConstraints and an IP address (in a subtree or its "
                            "subjectAltName): wolfSSL 5.5 leaves cannot verify it")
    return Review(refused=tuple(refused), warnings=tuple(warnings))


def cannot_issue(cert: x509.Certificate, now: dt.datetime) -> str | None:
    """Why `cert` cannot certify the API's short-lived keys at `now` (not a CA, or refused), or None."""
    found = review(cert, now)
    return found.not_issuing or ("; ".join(found.refused) if found.refused else None)


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


def _permitted(nc: x509.NameConstraints, name: x509.GeneralName) -> bool:
    """Whether RFC 5280 name constraints allow `name` (a DNS name or an IP address)."""
    kind = type(name)
    permitted = [s for s in nc.permitted_subtrees or [] if type(s) is kind]
    excluded = [s for s in nc.excluded_subtrees or [] if type(s) is kind]
    if any(_within(name, s) for s in excluded):
        return False
    return not permitted or any(_within(name, s) for s in permitted)


def _within(name: x509.GeneralName, subtree: x509.GeneralName) -> bool:
    if isinstance(name, x509.IPAddress) and isinstance(subtree, x509.IPAddress):
        network = subtree.value
        return (isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network)
                and name.value.version == network.version and name.value in network)
    if isinstance(name, x509.DNSName) and isinstance(subtree, x509.DNSName):
        host, base = name.value.lower().rstrip("."), subtree.value.lower().rstrip(".")
        if not base:
            return True
        if base.startswith("."):  # a leading dot: subdomains only
            return host.endswith(base)
        return host == base or host.endswith("." + base)
    return False


def _name_text(name: x509.GeneralName) -> str:
    return str(name.value)


_EKU_NAMES = {value: "".join(w if i == 0 else w.capitalize() for i, w in enumerate(name.lower().split("_")))
              for name, value in vars(ExtendedKeyUsageOID).items()
              if isinstance(value, x509.ObjectIdentifier)}  # e.g. clientAuth, anyExtendedKeyUsage


def _eku_name(oid: x509.ObjectIdentifier) -> str:
    return _EKU_NAMES.get(oid, oid.dotted_string)


def _hours(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g} h"


def _extension(cert: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
