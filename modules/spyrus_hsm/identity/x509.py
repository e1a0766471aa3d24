"""X.509 credentials held in the HSM: selection, local chain checks, files for TLS stacks.

A credential is a private key in the token with its certificate (and chain) stored beside it
under the same label and CKA_ID. It is chosen by label, by certificate common name, or — when
the token holds exactly one — automatically. For Python's `ssl` the certificate chain is
written as PEM and the key as a provider key reference: no private key file ever exists.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature as InvalidSignatureError
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ..errors import Kind, SpyrusError
from ..files import write_atomic
from ..hsm import InvalidInput, ObjectNotFound
from ..keystore import KeyStore
from . import tls


class ChainError(SpyrusError, ValueError, kind=Kind.CREDENTIAL):
    """A certificate chain that a peer would reject; the message says why."""

    public_detail = "the X.509 credential for the request has a certificate chain a peer would reject"


@dataclass(frozen=True)
class X509Credential:
    label: str
    key_id: bytes
    common_name: str
    chain: tuple[x509.Certificate, ...]  # leaf first

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def is_ca(cert: x509.Certificate) -> bool:
    """A CA's certificate: basicConstraints with cA true (RFC 5280 4.2.1.9). A certificate without
    the extension is not a CA's, even a self-signed one: its key was never declared fit to sign
    certificates, so it neither issues nor is refused as a leaf for being an issuer."""
    constraints = extension(cert, x509.BasicConstraints)
    return constraints is not None and bool(constraints.ca)


def extension(cert: x509.Certificate, kind: type[Any]) -> Any:
    """The value of `cert`'s extension of this kind, or None."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def credentials(hsm: KeyStore, label: str | None = None) -> list[X509Credential]:
    """Every private key in the token (labelled `label`, if given) that has a certificate
    stored with it."""
    objects = hsm.list_objects() if label is None else hsm.find(label, "private") + hsm.find(label, "cert")
    cert_labels = {o.label for o in objects if o.type == "cert"}
    out = []
    for o in objects:
        if o.type == "private" and o.label in cert_labels:
            chain = tuple(hsm.certificate_chain(o.label))
            out.append(X509Credential(o.label, bytes.fromhex(o.id_hex), common_name(chain[0]), chain))
    return out


def select(hsm: KeyStore, label: str | None = None, cn: str | None = None) -> X509Credential:
    """The credential named by label and/or CN, or the only one in the token."""
    found = credentials(hsm, label)
    if label is not None:
        found = [c for c in found if c.label == label]
    if cn is not None:
        found = [c for c in found if c.common_name == cn]
    if len(found) == 1:
        return found[0]
    wanted = " and ".join(x for x in (f"label '{label}'" if label else "", f"CN '{cn}'" if cn else "") if x)
    listing = ", ".join(f"'{c.label}' (CN {c.common_name})" for c in credentials(hsm)) or "none"
    if not found:
        raise ObjectNotFound(f"no X.509 credential {('with ' + wanted) if wanted else ''} in the token; "
                             f"credentials present: {listing}; import one with 'spyrus-hsm key import-pkcs12' "
                             "or 'key generate' + 'cert import'")
    raise InvalidInput(f"{len(found)} X.509 credentials match{(' ' + wanted) if wanted else ''} ({listing}); "
                       "choose one by label or common name")


def validate_chain(chain: tuple[x509.Certificate, ...] | list[x509.Certificate],
                   trust_anchor: x509.Certificate | None = None,
                   now: dt.datetime | None = None) -> None:
    """Check locally what a server would check, before connecting (an incomplete chain made
    DPS registration loop forever: azure-iot-sdk-python #797)."""
    now = now or dt.datetime.now(dt.UTC)
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ChainError(f"certificate '{cert.subject.rfc4514_string()}' is not valid now "
                             f"(valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})")
    for child, parent in itertools.pairwise(chain):
        _issued_by(child, parent)
    if trust_anchor is not None and chain[-1] != trust_anchor:
        _issued_by(chain[-1], trust_anchor)


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignatureError) as exc:
        raise ChainError(f"certificate '{child.subject.rfc4514_string()}' is not issued by "
                         f"'{parent.subject.rfc4514_string()}' ({type(exc).__name__}); the chain is "
                         "incomplete or out of order") from None


def chain_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """The certificates as concatenated PEM, in the order given (leaf first for a chain)."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path   # PEM certificate chain, leaf first
    key_file: Path    # PKCS#11 PROVIDER URI reference (no key material)


def write_tls_files(cred: X509Credential, token_label: str, directory: str | os.PathLike[str]) -> TlsFiles:
    """The files `ssl.load_cert_chain` / the SDK's X509 take for this credential."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = d / f"{cred.label}.chain.pem", d / f"{cred.label}.keyref.pem"
    write_atomic(cert_file, chain_pem(cred.chain))
    write_atomic(key_file, tls.keyref_pem(tls.key_uri(token_label, cred.label, cred.key_id or None)))
    return TlsFiles(cert_file, key_file)
