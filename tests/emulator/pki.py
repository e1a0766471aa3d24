"""Test PKI for the emulator and its tests: CAs, a TLS server certificate, device certificates.

Everything is EC P-256 (fast to generate), except the certificate-issuing CA of DPS, which is
P-384 signing with SHA-384 as Azure Device Registry's CAs are. PEM files are written only where a caller asks,
typically into pytest's tmp_path; nothing here is fit for production use.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ONE_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class PemFiles:
    """Where a certificate (followed by its intermediates) and its private key were written."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key and the intermediates between it and the root.

    ``chain`` excludes both this certificate and the self-signed root; it is what a TLS peer
    sends after its own certificate.
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    is_root: bool = False

    @property
    def cert_pem(self) -> str:
        return cert_to_pem(self.cert)

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()

    @property
    def chain_pem(self) -> str:
        """This certificate followed by its intermediates (the content of a TLS cert file)."""
        return "".join(cert_to_pem(c) for c in (self.cert, *self.chain))

    def write(self, directory: Path, name: str) -> PemFiles:
        """Write ``{name}.cert.pem`` (with intermediates) and ``{name}.key.pem`` (mode 0600)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_file = directory / f"{name}.cert.pem"
        key_file = directory / f"{name}.key.pem"
        cert_file.write_text(self.chain_pem)
        key_file.touch(mode=0o600)
        key_file.write_text(self.key_pem)
        return PemFiles(cert_file, key_file)


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Issued | None,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    issuer_name = issuer.cert.subject if issuer else _name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _ONE_DAY)
        .not_valid_after(not_after or now + 365 * _ONE_DAY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
        builder = builder.add_extension(aki, critical=False)
    return builder


def _sign(builder: x509.CertificateBuilder, signer: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    # The digest follows the signer's curve: SHA-384 for a P-384 CA, SHA-256 otherwise.
    digest = hashes.SHA384() if signer.curve.key_size >= 384 else hashes.SHA256()
    return builder.sign(signer, digest)


def _chain_below(issuer: Issued) -> tuple[x509.Certificate, ...]:
    return () if issuer.is_root else (issuer.cert, *issuer.chain)


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def make_ca(
    common_name: str,
    issuer: Issued | None = None,
    *,
    days: int = 3650,
    curve: ec.EllipticCurve | None = None,
) -> Issued:
    """A root CA (no issuer) or an intermediate CA signed by ``issuer`` (default P-256)."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = _builder(common_name, key, issuer, now - _ONE_DAY, now + days * _ONE_DAY)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        ),
        critical=True,
    )  # fmt: skip
    cert = _sign(builder, issuer.key if issuer else key)
    chain = _chain_below(issuer) if issuer else ()
    return Issued(cert, key, chain, is_root=issuer is None)


def make_server_cert(
    issuer: Issued,
    *,
    dns_names: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = (),
    common_name: str = "emulator",
) -> Issued:
    """A TLS server certificate whose SAN lists ``dns_names`` and ``ip_addresses``."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    builder = _builder(common_name, key, issuer, None, None)
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
    builder = builder.add_extension(_leaf_key_usage(), critical=True)
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
    )
    return Issued(_sign(builder, issuer.key), key, _chain_below(issuer))


def make_device_cert(
    issuer: Issued,
    common_name: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A TLS client certificate with CN ``common_name`` (Azure: the device/registration id)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(common_name, key, issuer, not_before, not_after)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
    builder = builder.add_extension(_leaf_key_usage(), critical=True)
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    return Issued(_sign(builder, issuer.key), key, _chain_below(issuer))


def issue_from_csr(
    issuer: Issued,
    csr: x509.CertificateSigningRequest,
    validity: dt.timedelta,
    *,
    server_names: Sequence[str] = (),
) -> x509.Certificate:
    """An operational client certificate for the CSR's key and subject, valid from a minute
    ago (clock skew) for ``validity``: what DPS certificate management issues. With
    ``server_names``, a TLS server certificate for those DNS names instead."""
    now = dt.datetime.now(dt.UTC)
    public_key = csr.public_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]  # the caller checked its type
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)  # type: ignore[arg-type]
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    )
    if server_names:
        names = [x509.DNSName(n) for n in server_names]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _sign(builder, issuer.key)


@dataclass
class EmulatorPki:
    """A root CA, an intermediate below it, and helpers that issue and write leaf certificates.

    Clients trust ``root`` (``ca_pem``); the emulator's server certificates come from ``root``;
    device certificates default to ``intermediate`` and their files carry the intermediate.
    """

    directory: Path
    root: Issued = field(default_factory=lambda: make_ca("Emulator Test Root CA"))
    intermediate: Issued = field(init=False)
    _servers: dict[tuple[str, ...], PemFiles] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.intermediate = make_ca("Emulator Test Intermediate CA", self.root)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "root-ca.pem").write_text(self.root.cert_pem)

    @property
    def ca_pem(self) -> str:
        """The root CA PEM: what clients pass as ``server_verification_cert``."""
        return self.root.cert_pem

    @property
    def ca_file(self) -> Path:
        return self.directory / "root-ca.pem"

    def server(self, hosts: Sequence[str]) -> PemFiles:
        """Server certificate files for ``hosts`` (IPs or DNS names) plus ``localhost``."""
        key = tuple(sorted(set(hosts)))
        if key not in self._servers:
            ips = [h for h in key if _is_ip(h)]
            dns = ["localhost", *(h for h in key if not _is_ip(h) and h != "localhost")]
            issued = make_server_cert(self.root, dns_names=dns, ip_addresses=ips)
            self._servers[key] = issued.write(self.directory, "server-" + "_".join(key))
        return self._servers[key]

    def device(
        self,
        common_name: str,
        issuer: Issued | None = None,
        *,
        name: str | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> PemFiles:
        """Issue a device certificate (default issuer: the intermediate) and write its files."""
        issued = make_device_cert(
            issuer or self.intermediate, common_name, not_before=not_before, not_after=not_after
        )
        default_name = f"device-{common_name}-{issued.cert.serial_number:x}"
        return issued.write(self.directory, name or default_name)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
