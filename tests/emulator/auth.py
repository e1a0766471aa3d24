"""Credential checks as IoT Hub and DPS make them: SAS tokens and X.509 client certificates.

Every check raises ``AuthError`` with a reason fit for logs and test records; reasons never
contain a signature or a key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

SAS_PREFIX = "SharedAccessSignature "
_REQUIRED_SAS_FIELDS = frozenset({"sr", "sig", "se"})
_KNOWN_SAS_FIELDS = _REQUIRED_SAS_FIELDS | {"skn"}


class AuthError(Exception):
    """The presented credential does not authenticate the claimed identity."""


@dataclass(frozen=True)
class Credential:
    """What a device, module or enrollment authenticates with: SAS keys or an X.509 CA.

    ``ca`` may be a root, an intermediate or the device certificate itself: the presented
    chain must contain it (or its last certificate must be issued by it).
    """

    keys: tuple[str, ...] = ()
    ca: x509.Certificate | None = field(default=None, repr=False)

    @classmethod
    def make(
        cls,
        owner: str,
        symmetric_key: str | None = None,
        secondary_key: str | None = None,
        x509_ca_pem: str | bytes | None = None,
    ) -> Credential:
        """Validate the arguments of an ``add_*`` call; ``owner`` names it in errors."""
        if (symmetric_key is None) == (x509_ca_pem is None):
            raise ValueError(f"{owner}: give exactly one of symmetric_key or x509_ca_pem")
        if x509_ca_pem is not None:
            if secondary_key is not None:
                raise ValueError(f"{owner}: secondary_key needs symmetric_key")
            pem = x509_ca_pem.encode() if isinstance(x509_ca_pem, str) else x509_ca_pem
            return cls(ca=x509.load_pem_x509_certificate(pem))
        keys = tuple(k for k in (symmetric_key, secondary_key) if k is not None)
        for key in keys:
            decode_key(key, owner)
        return cls(keys=keys)

    @property
    def method(self) -> str:
        return "x509" if self.ca is not None else "sas"


def decode_key(key: str, owner: str = "key") -> bytes:
    """Base64-decode a symmetric key; Azure accepts 16 to 64 bytes."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{owner}: symmetric key is not valid base64") from None
    if not 16 <= len(raw) <= 64:
        raise ValueError(f"{owner}: symmetric key must decode to 16-64 bytes, not {len(raw)}")
    return raw


def new_symmetric_key() -> str:
    """A random 32-byte key, base64 encoded, as Azure generates them."""
    return base64.b64encode(os.urandom(32)).decode()


def sign(key: str, resource_uri: str, expiry: int) -> str:
    """The SAS signature Azure expects for ``resource_uri`` valid until ``expiry``."""
    message = quote(resource_uri, safe="") + "\n" + str(expiry)
    digest = hmac.new(base64.b64decode(key), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def make_sas_token(key: str, resource_uri: str, expiry: int, key_name: str | None = None) -> str:
    """A SAS token as the SDK builds it (used by tests and the standalone tool)."""
    token = (
        f"{SAS_PREFIX}sr={quote(resource_uri, safe='')}"
        f"&sig={quote(sign(key, resource_uri, expiry), safe='')}&se={expiry}"
    )
    return token + (f"&skn={key_name}" if key_name else "")


def derive_group_key(group_key: str, registration_id: str) -> str:
    """DPS group enrollment: the device key is HMAC-SHA256(groupKey, registrationId)."""
    digest = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


@dataclass(frozen=True)
class SasToken:
    resource_uri: str
    signature: str = field(repr=False)
    expiry: int
    key_name: str | None


def parse_sas_token(password: bytes | None) -> SasToken:
    """Parse an MQTT password as a SAS token (strictly, like the SDK's own parser)."""
    if password is None:
        raise AuthError("no password (SAS token) and no client certificate")
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError("password is not UTF-8") from None
    if not text.startswith(SAS_PREFIX):
        raise AuthError("password is not a SharedAccessSignature token")
    fields: dict[str, str] = {}
    for part in text[len(SAS_PREFIX) :].split("&"):
        name, sep, value = part.partition("=")
        if not sep or name in fields:
            raise AuthError("SAS token is malformed")
        fields[name] = value
    if not _REQUIRED_SAS_FIELDS <= fields.keys() or not fields.keys() <= _KNOWN_SAS_FIELDS:
        raise AuthError("SAS token needs sr, sig, se (and optionally skn), nothing else")
    if not fields["se"].isdigit():
        raise AuthError("SAS token expiry 'se' is not an integer")
    return SasToken(
        unquote(fields["sr"]), unquote(fields["sig"]), int(fields["se"]), fields.get("skn")
    )


def check_sas(
    token: SasToken,
    expected_uri: str,
    keys: Iterable[str],
    allowed_key_names: Sequence[str | None] = (None,),
    now: float | None = None,
) -> None:
    """Accept ``token`` only for exactly ``expected_uri``, unexpired, signed by one of ``keys``."""
    if token.resource_uri != expected_uri:
        raise AuthError(f"SAS resource {token.resource_uri!r} is not {expected_uri!r}")
    if token.key_name not in allowed_key_names:
        raise AuthError(f"SAS key name skn={token.key_name!r} is not accepted here")
    if token.expiry <= (time.time() if now is None else now):
        raise AuthError(f"SAS token expired at {token.expiry}")
    presented = token.signature.encode()
    if not any(hmac.compare_digest(presented, sign(k, expected_uri, token.expiry).encode())
               for k in keys):  # fmt: skip
        raise AuthError("SAS signature does not match the enrolled key")


def load_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in chain_der]


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


def check_x509(
    chain: Sequence[x509.Certificate],
    ca: x509.Certificate,
    expected_cn: str,
    now: dt.datetime | None = None,
) -> None:
    """Accept a TLS-verified client chain (leaf first) only if it leads to ``ca``, every
    certificate is within its validity period and the leaf CN is ``expected_cn``."""
    if not chain:
        raise AuthError("no client certificate")
    now = now or dt.datetime.now(dt.UTC)
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise AuthError(f"certificate {cert.subject.rfc4514_string()!r} is not valid now")
    if not _chain_reaches(chain, ca):
        raise AuthError(f"certificate chain does not lead to the CA enrolled for {expected_cn!r}")
    cn = common_name(chain[0])
    if cn != expected_cn:
        raise AuthError(f"certificate CN {cn!r} is not {expected_cn!r}")


def _same_cert(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a == b or (a.subject == b.subject and a.public_key() == b.public_key())


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chain_reaches(chain: Sequence[x509.Certificate], ca: x509.Certificate) -> bool:
    """Walk leaf -> issuer, checking each signature, until ``ca`` is met or signs a link."""
    for i, cert in enumerate(chain):
        if _same_cert(cert, ca) or _issued_by(cert, ca):
            return True
        if i + 1 == len(chain) or not _issued_by(cert, chain[i + 1]):
            return False
    return False
