"""Certificate signing requests signed by a key inside the HSM (no software key exists)."""

from __future__ import annotations

import ipaddress

from asn1crypto import csr as asn1csr
from asn1crypto import keys as asn1keys
from asn1crypto import x509 as asn1x509
from cryptography import x509

from ..hsm import InvalidInput
from ..keystore import KeyStore
from . import hsm_signature


def parse_subject(subject: str) -> x509.Name:
    """An RFC 4514 subject ("CN=dev1,O=Contoso") checked to hold a CN."""
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError as exc:
        raise InvalidInput(f"subject {subject!r} is not an RFC 4514 name: {exc}") from None
    if not name.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
        raise InvalidInput("the subject needs a CN (Azure uses it as the device id)")
    return name


def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 or IPv6 address for a subjectAltName, or InvalidInput naming what was given."""
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise InvalidInput(f"{text!r} is not an IPv4 or IPv6 address (e.g. 192.168.10.5 or fd00::5)") from None


def build_csr(hsm: KeyStore, label: str, subject: str, dns_names: list[str] | None = None,
              ip_addresses: list[str] | None = None) -> bytes:
    """DER PKCS#10 request for the key pair `label`, signed in the HSM; `dns_names` and
    `ip_addresses` (IPv4 or IPv6, checked by `ip_address`) go into its subjectAltName."""
    name = parse_subject(subject)
    algorithm = hsm.key_algorithm(label)
    spki = hsm.public_key(label)
    from cryptography.hazmat.primitives import serialization

    spki_der = spki.public_bytes(serialization.Encoding.DER,
                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    attributes = []
    names = [asn1x509.GeneralName("dns_name", d) for d in dns_names or ()]
    names += [asn1x509.GeneralName("ip_address", str(ip_address(a))) for a in ip_addresses or ()]
    if names:
        ext = asn1x509.Extensions([{"extn_id": "subject_alt_name", "critical": False, "extn_value": names}])
        attributes.append({"type": "extension_request", "values": [ext]})
    info = asn1csr.CertificationRequestInfo({
        "version": "v1",
        "subject": asn1x509.Name.load(name.public_bytes()),
        "subject_pk_info": asn1keys.PublicKeyInfo.load(spki_der),
        "attributes": attributes,
    })
    sig_alg, signature = hsm_signature.sign(hsm, label, algorithm, info.dump())
    req = asn1csr.CertificationRequest({
        "certification_request_info": info,
        "signature_algorithm": {"algorithm": sig_alg},
        "signature": signature,
    })
    return bytes(req.dump())
