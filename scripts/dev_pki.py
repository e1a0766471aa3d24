"""Development PKI for `make run` (never for production): a CA that certifies the service's key
(from a CSR whose key stays in the HSM) and a demo leaf certificate.

The service's certificate is an issuing one, as the API's TLS design wants it (the HSM key
certifies the short-lived in-memory keys the API handshakes with): a path-length-0 CA
(basicConstraints critical) with keyUsage keyCertSign and digitalSignature (critical),
extendedKeyUsage serverAuth only (a verifier that checks a CA's extended key usage, OpenSSL or
GnuTLS, accepts nothing but TLS server certificates below it), and the service's names
(localhost, 127.0.0.1) as its subjectAltName. It carries no nameConstraints: mbedTLS 2.28
refuses to parse a certificate with critical ones, and wolfSSL 5.5 fails any chain whose
constraints have an IP subtree (docs/security/api-tls.md).

    python scripts/dev_pki.py ca DIR                      # DIR/ca.pem, DIR/ca.key (once)
    python scripts/dev_pki.py sign-server DIR CSR OUT     # SAN localhost + 127.0.0.1
    python scripts/dev_pki.py can-issue CHAIN             # exit 0 if CHAIN's first certificate can issue
                                                          # (and has no nameConstraints, as earlier ones had)
    python scripts/dev_pki.py leaf DIR CN                 # DIR/CN.pem, DIR/CN.key (once)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = dt.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _load_ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _issue(builder: x509.CertificateBuilder, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
           public_key: ec.EllipticCurvePublicKey, eku: x509.ObjectIdentifier) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (builder.issuer_name(ca.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def make_ca(d: Path) -> None:
    if (d / "ca.pem").exists():
        ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        if ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length != 0:
            return
        # An earlier version's CA (path length 0) cannot have an issuing service certificate
        # below it: start again, with the demo leaf it signed.
        for old in [d / "ca.pem", d / "ca.key", *d.glob("*.pem"), *d.glob("*.key")]:
            old.unlink(missing_ok=True)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("spyrus-hsm development CA"))
            .issuer_name(_name("spyrus-hsm development CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - DAY)
            .not_valid_after(now + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(d / "ca.key", key)
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def sign_server(d: Path, csr_file: Path, out: Path) -> None:
    ca, ca_key = _load_ca(d)
    csr = x509.load_pem_x509_csr(csr_file.read_bytes())
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    loopback = ipaddress.ip_address("127.0.0.1")
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + 365 * DAY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(loopback)]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))


def can_issue(chain_file: Path) -> bool:
    if not chain_file.exists():
        return False
    cert = x509.load_pem_x509_certificates(chain_file.read_bytes())[0]
    try:
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
    # An earlier version's service certificate had critical nameConstraints, which mbedTLS leaves
    # cannot parse: `make run` replaces it.
    return is_ca and not any(isinstance(e.value, x509.NameConstraints) for e in cert.extensions)


def make_leaf(d: Path, cn: str) -> None:
    if (d / f"{cn}.pem").exists():
        return
    ca, ca_key = _load_ca(d)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(x509.CertificateBuilder().subject_name(_name(cn)), ca, ca_key, key.public_key(),
                  ExtendedKeyUsageOID.CLIENT_AUTH)
    _write_key(d / f"{cn}.key", key)
    (d / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "ca":
        make_ca(Path(argv[1]))
    elif len(argv) == 4 and argv[0] == "sign-server":
        sign_server(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    elif len(argv) == 2 and argv[0] == "can-issue":
        return 0 if can_issue(Path(argv[1])) else 1
    elif len(argv) == 3 and argv[0] == "leaf":
        make_leaf(Path(argv[1]), argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
