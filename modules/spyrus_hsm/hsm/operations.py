"""PKCS#11 operations, each run on a worker thread with that worker's own session.

Every function here takes a `WorkerSession` first; `hsm.client.Hsm` submits them to the pool.
Searches are always materialised (`list(...)`) and restricted to token objects
(CKA_TOKEN=true), because session objects of other users of the library in this process
(pkcs11-provider) are visible to our sessions too.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import pkcs11.exceptions as p11e
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pkcs11 import MGF, Attribute, CertificateType, KeyType, Mechanism, ObjectClass
from pkcs11.types import Key, Object, PublicKey, Session, SignMixin
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from .encoding import key_id_from_spki
from .errors import DuplicateObject, InvalidInput, ObjectNotFound, TokenChanged
from .faults import is_device_fault
from .library import TokenSummary, summarise
from .secret import Secret
from .uri import Pkcs11Uri

Template = dict[Attribute, object]
# What a search asked for: (class, label, id). A worker's handle cache and the pool's record of
# objects seen since the token was last read are keyed by it.
ObjectKey = tuple[ObjectClass, str | None, bytes | None]

P256_OID = "1.2.840.10045.3.1.7"
P384_OID = "1.3.132.0.34"
CATEGORY_USER = 1       # CKA_CERTIFICATE_CATEGORY: the key owner's certificate
CATEGORY_AUTHORITY = 2  # a CA certificate of the chain

_CLASS_BY_TYPE = {
    "private": ObjectClass.PRIVATE_KEY,
    "public": ObjectClass.PUBLIC_KEY,
    "cert": ObjectClass.CERTIFICATE,
    "secret-key": ObjectClass.SECRET_KEY,
    "data": ObjectClass.DATA,
}
_TYPE_BY_CLASS = {v: k for k, v in _CLASS_BY_TYPE.items()}


class SignAlgorithm(Enum):
    HMAC_SHA256 = "HMAC-SHA256"
    ECDSA_SHA256 = "ECDSA-SHA256"      # raw r||s (JWS ES256); DER via encoding.ecdsa_raw_to_der
    ECDSA_SHA384 = "ECDSA-SHA384"      # raw r||s (JWS ES384)
    RSA_PKCS1_SHA256 = "RS256"
    RSA_PSS_SHA256 = "PS256"


class KeyAlgorithm(Enum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"

    @property
    def is_ec(self) -> bool:
        return self in (KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384)


_CURVE_OIDS = {KeyAlgorithm.EC_P256: P256_OID, KeyAlgorithm.EC_P384: P384_OID}
# ECDSA with SHA-256 for P-256 and SHA-384 for P-384 (the digest as long as the curve's order,
# as Azure's P-384 CAs and TLS 1.3's signature schemes pair them).
_IMPORTABLE_CURVES = {"secp256r1": KeyAlgorithm.EC_P256, "secp384r1": KeyAlgorithm.EC_P384}
_ECDSA_DIGESTS = {SignAlgorithm.ECDSA_SHA256: hashlib.sha256, SignAlgorithm.ECDSA_SHA384: hashlib.sha384}


@dataclass(frozen=True)
class ObjectInfo:
    label: str
    id_hex: str
    type: str
    key_type: str | None
    sensitive: bool | None
    extractable: bool | None
    subject: str | None = None
    not_after: str | None = None
    category: str | None = None


class WorkerSession:
    """One worker thread's session plus its cache of object handles.

    `token` is the token the pool logged in to; `seen` (shared by the pool's sessions of one
    generation) records the objects found since the token was last read: one of them missing
    later means the token's contents changed under the module, not a wrong label."""

    def __init__(self, session: Session, token: TokenSummary, generation: int,
                 seen: set[ObjectKey]) -> None:
        self.session = session
        self.token = token
        self.token_label = token.label
        self.generation = generation  # the pool's library generation this session belongs to
        self.epoch = 0       # the pool's object epoch its handle cache reflects
        self._seen = seen
        self._cache: dict[ObjectKey, Object] = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    def forget_seen(self) -> None:
        """Objects are being deleted through this module: their absence is no news."""
        self._seen.clear()

    def find(self, uri: Pkcs11Uri, cls: ObjectClass) -> Object:
        """Exactly one token object of class `cls` matching the URI (cached per worker)."""
        key = (cls, uri.object, uri.id)
        obj = self._cache.get(key)
        if obj is None:
            found = self.search(uri, cls)
            if not found and key in self._seen:
                raise TokenChanged(
                    f"the {_TYPE_BY_CLASS[cls]} object {_describe(uri)} was on token "
                    f"'{self.token_label}' and is gone; re-reading the token, retry shortly"
                )
            if not found:
                raise ObjectNotFound(
                    f"no {_TYPE_BY_CLASS[cls]} object {_describe(uri)} on token "
                    f"'{self.token_label}'; see 'spyrus-hsm list'",
                    public=f"no {_TYPE_BY_CLASS[cls]} object {_describe(uri)}"
                )
            if len(found) > 1:
                raise DuplicateObject(
                    f"{len(found)} {_TYPE_BY_CLASS[cls]} objects match {_describe(uri)}; "
                    "refer to one by id (pkcs11:id=...) or delete the extra ones",
                    public=f"more than one {_TYPE_BY_CLASS[cls]} object {_describe(uri)}"
                )
            obj = self._cache[key] = found[0]
            self._seen.add(key)
        return obj

    def search(self, uri: Pkcs11Uri, cls: ObjectClass | None) -> list[Object]:
        if uri.token is not None and uri.token != self.token_label:
            raise ObjectNotFound(
                f"the reference names token '{uri.token}' but this module uses "
                f"token '{self.token_label}'"
            )
        template: Template = {Attribute.TOKEN: True}
        if cls is not None:
            template[Attribute.CLASS] = cls
        if uri.object is not None:
            template[Attribute.LABEL] = uri.object
        if uri.id is not None:
            template[Attribute.ID] = uri.id
        return list(self.session.get_objects(template))


def _describe(uri: Pkcs11Uri) -> str:
    parts = []
    if uri.object is not None:
        parts.append(f"labelled '{uri.object}'")
    if uri.id is not None:
        parts.append(f"with id {uri.id.hex()}")
    return " ".join(parts)


def _retry_stale(ws: WorkerSession, fn: Callable[[], bytes]) -> bytes:
    """Run fn; if a cached handle went stale, look up once more. The object was deleted
    elsewhere (then the lookup says so), or the token's contents changed under the module
    (then the lookup misses an object seen before and the pool re-reads the token)."""
    try:
        return fn()
    except (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid):
        ws.clear_cache()
        return fn()


def _signer(ws: WorkerSession, uri: Pkcs11Uri, cls: ObjectClass) -> SignMixin:
    obj = ws.find(uri, cls)
    if not isinstance(obj, SignMixin):
        message = f"the {_TYPE_BY_CLASS[cls]} object {_describe(uri)} cannot sign"
        raise InvalidInput(message, public=message)
    return obj


# --- signing ---------------------------------------------------------------------------------

def sign(ws: WorkerSession, uri: Pkcs11Uri, algorithm: SignAlgorithm, data: bytes) -> bytes:
    if algorithm is SignAlgorithm.HMAC_SHA256:
        return bytes(_retry_stale(ws, lambda: _signer(ws, uri, ObjectClass.SECRET_KEY).sign(
            data, mechanism=Mechanism.SHA256_HMAC)))
    if algorithm in _ECDSA_DIGESTS:
        # SoftHSM 2.6 has no CKM_ECDSA_SHA256/384: hash here, sign the digest with CKM_ECDSA.
        digest = _ECDSA_DIGESTS[algorithm](data).digest()
        return bytes(_retry_stale(ws, lambda: _signer(ws, uri, ObjectClass.PRIVATE_KEY).sign(
            digest, mechanism=Mechanism.ECDSA)))
    if algorithm is SignAlgorithm.RSA_PKCS1_SHA256:
        return bytes(_retry_stale(ws, lambda: _signer(ws, uri, ObjectClass.PRIVATE_KEY).sign(
            data, mechanism=Mechanism.SHA256_RSA_PKCS)))
    if algorithm is SignAlgorithm.RSA_PSS_SHA256:
        param = (Mechanism.SHA256, MGF.SHA256, 32)
        return bytes(_retry_stale(ws, lambda: _signer(ws, uri, ObjectClass.PRIVATE_KEY).sign(
            data, mechanism=Mechanism.SHA256_RSA_PKCS_PSS, mechanism_param=param)))
    raise InvalidInput(f"unsupported algorithm {algorithm}", public=f"unsupported algorithm {algorithm}")


MECHANISM_NAMES = {
    SignAlgorithm.HMAC_SHA256: "CKM_SHA256_HMAC",
    SignAlgorithm.ECDSA_SHA256: "CKM_ECDSA",
    SignAlgorithm.ECDSA_SHA384: "CKM_ECDSA",
    SignAlgorithm.RSA_PKCS1_SHA256: "CKM_SHA256_RSA_PKCS",
    SignAlgorithm.RSA_PSS_SHA256: "CKM_SHA256_RSA_PKCS_PSS",
}


def probe(ws: WorkerSession) -> None:
    """Is the token logged in to still there, and still the same one?

    C_GetTokenInfo, compared with the token's label and serial at login: a module can go on
    answering C_GenerateRandom while the token's contents are unreadable (SoftHSM2 with its
    token directory moved away) or after another token took its place. Then C_GenerateRandom,
    the cheapest call that needs the token itself."""
    try:
        now = summarise(ws.session.token.slot.get_token())
    except p11e.PKCS11Error as exc:
        if is_device_fault(exc):
            raise  # unplugged: the usual recovery
        raise TokenChanged(f"token '{ws.token.label}' contents unreadable "
                           f"(C_GetTokenInfo: {type(exc).__name__})") from None
    if now.serial != ws.token.serial:
        raise TokenChanged(f"token serial changed from {ws.token.serial} to {now.serial}")
    if now.label != ws.token.label:
        raise TokenChanged(f"token label changed from '{ws.token.label}' to '{now.label}'")
    ws.session.generate_random(64)


def _key(ws: WorkerSession, uri: Pkcs11Uri, cls: ObjectClass) -> Key:
    obj = ws.find(uri, cls)
    if not isinstance(obj, Key):
        raise InvalidInput(f"the {_TYPE_BY_CLASS[cls]} object {_describe(uri)} is not a key")
    return obj


def key_algorithm(ws: WorkerSession, uri: Pkcs11Uri) -> KeyAlgorithm:
    key = _key(ws, uri, ObjectClass.PRIVATE_KEY)
    if key.key_type != KeyType.EC:
        return KeyAlgorithm.RSA_2048
    params = bytes(key[Attribute.EC_PARAMS])
    return next((a for a, oid in _CURVE_OIDS.items() if encode_named_curve_parameters(oid) == params),
                KeyAlgorithm.EC_P256)


# --- reading ---------------------------------------------------------------------------------

def public_key_spki(ws: WorkerSession, uri: Pkcs11Uri) -> bytes:
    """DER SubjectPublicKeyInfo of the key pair named by `uri` (public object or certificate)."""
    pubs = ws.search(uri.with_(type=None), ObjectClass.PUBLIC_KEY)
    if len(pubs) == 1 and isinstance(pubs[0], PublicKey):
        pub = pubs[0]
        if pub.key_type == KeyType.EC:
            return bytes(encode_ec_public_key(pub))
        return _rsa_spki(encode_rsa_public_key(pub))
    certs = certificate_chain(ws, uri)
    return x509.load_der_x509_certificate(certs[0]).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _rsa_spki(pkcs1_der: bytes) -> bytes:
    key = serialization.load_der_public_key(_wrap_rsa(pkcs1_der))
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _wrap_rsa(pkcs1_der: bytes) -> bytes:
    from asn1crypto.keys import PublicKeyInfo, RSAPublicKey

    info = PublicKeyInfo({"algorithm": {"algorithm": "rsa"},
                          "public_key": RSAPublicKey.load(pkcs1_der)})
    return bytes(info.dump())


def certificate_chain(ws: WorkerSession, uri: Pkcs11Uri) -> list[bytes]:
    """Certificates stored under the reference: the owner's first, then up the chain."""
    certs = [bytes(c[Attribute.VALUE]) for c in ws.search(uri.with_(type=None), ObjectClass.CERTIFICATE)]
    if not certs:
        raise ObjectNotFound(
            f"no certificate {_describe(uri)} on token '{ws.token_label}'; "
            "add one with 'spyrus-hsm cert import'",
            public=f"no certificate {_describe(uri)}"
        )
    return order_chain(certs)


def order_chain(ders: Iterable[bytes]) -> list[bytes]:
    """Leaf first, each next certificate the issuer of the previous one."""
    parsed = [x509.load_der_x509_certificate(d) for d in ders]
    issuers = {c.issuer for c in parsed if c.issuer != c.subject}
    leaves = [c for c in parsed if c.subject not in issuers] or parsed[:1]
    chain = [leaves[0]]
    rest = [c for c in parsed if c is not leaves[0]]
    while rest:
        nxt = next((c for c in rest if c.subject == chain[-1].issuer), None)
        if nxt is None:
            chain += rest
            break
        chain.append(nxt)
        rest.remove(nxt)
    return [c.public_bytes(serialization.Encoding.DER) for c in chain]


def list_objects(ws: WorkerSession) -> list[ObjectInfo]:
    out = []
    for obj in ws.session.get_objects({Attribute.TOKEN: True}):
        out.append(_info(obj))
    return sorted(out, key=lambda i: (i.label, i.type, i.id_hex))


def find_objects(ws: WorkerSession, label: str, type: str | None) -> list[ObjectInfo]:
    """The token objects labelled `label` (of one type: private, public, cert, secret-key,
    data; None: any), sorted like `list_objects`. One C_FindObjects with a template: only the
    matches are read, not the whole token."""
    cls = _CLASS_BY_TYPE.get(type) if type is not None else None
    if type is not None and cls is None:
        raise InvalidInput(f"unknown object type '{type}'; one of {', '.join(_CLASS_BY_TYPE)}")
    found = [_info(obj) for obj in ws.search(Pkcs11Uri(object=label), cls)]
    return sorted(found, key=lambda i: (i.label, i.type, i.id_hex))


def _info(obj: Object) -> ObjectInfo:
    cls = obj[Attribute.CLASS]
    label = obj[Attribute.LABEL]
    ident = bytes(obj[Attribute.ID]).hex()
    kind = _TYPE_BY_CLASS.get(cls, str(cls))
    if cls == ObjectClass.CERTIFICATE:
        cert = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
        category = _safe_attr(obj, Attribute.CERTIFICATE_CATEGORY)
        return ObjectInfo(label, ident, kind, None, None, None,
                          subject=cert.subject.rfc4514_string(),
                          not_after=cert.not_valid_after_utc.isoformat(),
                          category={CATEGORY_USER: "user", CATEGORY_AUTHORITY: "authority"}
                          .get(category or 0))
    key_type = obj[Attribute.KEY_TYPE] if cls in _TYPE_BY_CLASS and cls != ObjectClass.DATA else None
    sensitive = extractable = None
    if cls in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
        sensitive = bool(obj[Attribute.SENSITIVE])
        extractable = bool(obj[Attribute.EXTRACTABLE])
    return ObjectInfo(label, ident, kind, getattr(key_type, "name", None), sensitive, extractable)


def _safe_attr(obj: Object, attr: Attribute) -> int | None:
    try:
        value = obj[attr]
    except p11e.PKCS11Error:
        return None
    return value if isinstance(value, int) else None


def secret_key_value_readable(ws: WorkerSession, uri: Pkcs11Uri) -> bool:
    """Whether CKA_VALUE of a secret key can be read (it must not be)."""
    key = ws.find(uri, ObjectClass.SECRET_KEY)
    try:
        key[Attribute.VALUE]
    except (p11e.AttributeSensitive, p11e.PKCS11Error):
        return False
    return True


# --- writing ---------------------------------------------------------------------------------

def _refuse_taken(ws: WorkerSession, label: str) -> None:
    taken = ws.search(Pkcs11Uri(object=label), None)
    if taken:
        raise DuplicateObject(
            f"objects labelled '{label}' already exist on token '{ws.token_label}'; "
            f"choose another label or remove them with 'spyrus-hsm delete --label {label}'"
        )


_SECRET_KEY_TEMPLATE: Template = {
    Attribute.CLASS: ObjectClass.SECRET_KEY,
    Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}


def import_secret_key(ws: WorkerSession, label: str, value: Secret) -> str:
    """Store an HMAC key as a sensitive, non-extractable token object; returns its id (hex)."""
    _refuse_taken(ws, label)
    if len(value) < 16:
        raise InvalidInput("the key is shorter than 16 bytes; Azure primary keys are 32 or 64")
    key_id = secrets.token_bytes(16)
    template = dict(_SECRET_KEY_TEMPLATE)
    template.update({Attribute.LABEL: label, Attribute.ID: key_id, Attribute.VALUE: value.reveal()})
    ws.session.create_object(template)
    return key_id.hex()


def derive_hmac_key(ws: WorkerSession, parent: Pkcs11Uri, message: bytes, label: str) -> str:
    """Store HMAC-SHA256(parent, message) as a new non-extractable key (DPS group enrollment).

    The derived value passes through this process's memory between C_Sign and C_CreateObject
    (PKCS#11 has no portable HMAC key-derivation mechanism); it is wiped right after.
    """
    _refuse_taken(ws, label)
    derived = Secret(sign(ws, parent, SignAlgorithm.HMAC_SHA256, message))
    try:
        return import_secret_key(ws, label, derived)
    finally:
        derived.wipe()


def generate_keypair(ws: WorkerSession, label: str, algorithm: KeyAlgorithm) -> str:
    """A key pair generated inside the token; the private half never leaves it. Returns id hex."""
    _refuse_taken(ws, label)
    temp_id = secrets.token_bytes(20)
    private_template: Template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                        Attribute.PRIVATE: True, Attribute.SIGN: True, Attribute.DECRYPT: False,
                        Attribute.UNWRAP: False, Attribute.DERIVE: False}
    public_template: Template = {Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False}
    if algorithm.is_ec:
        public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(_CURVE_OIDS[algorithm])
        pub, priv = ws.session.generate_keypair(
            KeyType.EC, store=True, label=label, id=temp_id,
            public_template=public_template, private_template=private_template)
        spki = bytes(encode_ec_public_key(pub))
    else:
        pub, priv = ws.session.generate_keypair(
            KeyType.RSA, 2048, store=True, label=label, id=temp_id,
            public_template=public_template, private_template=private_template)
        spki = _rsa_spki(encode_rsa_public_key(pub))
    key_id = key_id_from_spki(spki)
    pub[Attribute.ID] = key_id
    priv[Attribute.ID] = key_id
    return key_id.hex()


def import_private_key(ws: WorkerSession, label: str, key: PrivateKeyTypes, key_id: bytes) -> None:
    """Store a software private key (from a PKCS#12) as sensitive, non-extractable."""
    common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}
    priv: Template = {
        **common, Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
        Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.DERIVE: False,
    }
    pub: Template = {**common, Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                 Attribute.VERIFY: True, Attribute.ENCRYPT: False}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = _IMPORTABLE_CURVES.get(key.curve.name)
        if algorithm is None:
            raise InvalidInput(f"EC curve {key.curve.name} is not supported; use P-256 or P-384")
        params = encode_named_curve_parameters(_CURVE_OIDS[algorithm])
        point = key.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
        from asn1crypto.core import OctetString

        priv.update({Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: params,
                     Attribute.VALUE: key.private_numbers().private_value.to_bytes(
                         (key.curve.key_size + 7) // 8, "big")})
        pub.update({Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: params,
                    Attribute.EC_POINT: OctetString(point).dump()})
    elif isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        def b(i: int) -> bytes:
            return i.to_bytes((i.bit_length() + 7) // 8 or 1, "big")
        priv.update({Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: b(n.public_numbers.n),
                     Attribute.PUBLIC_EXPONENT: b(n.public_numbers.e),
                     Attribute.PRIVATE_EXPONENT: b(n.d), Attribute.PRIME_1: b(n.p),
                     Attribute.PRIME_2: b(n.q), Attribute.EXPONENT_1: b(n.dmp1),
                     Attribute.EXPONENT_2: b(n.dmq1), Attribute.COEFFICIENT: b(n.iqmp)})
        pub.update({Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: b(n.public_numbers.n),
                    Attribute.PUBLIC_EXPONENT: b(n.public_numbers.e)})
    else:
        raise InvalidInput(f"{type(key).__name__} keys are not supported; use EC P-256 or RSA")
    ws.session.create_object(priv)
    ws.session.create_object(pub)


def store_certificates(ws: WorkerSession, label: str, key_id: bytes, ders: list[bytes]) -> None:
    """Store the chain under `label` with the key's CKA_ID: owner first (category user)."""
    for i, der in enumerate(order_chain(ders)):
        cert = x509.load_der_x509_certificate(der)
        ws.session.create_object({
            Attribute.CLASS: ObjectClass.CERTIFICATE,
            Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.LABEL: label,
            Attribute.ID: key_id,
            Attribute.SUBJECT: cert.subject.public_bytes(),
            Attribute.ISSUER: cert.issuer.public_bytes(),
            Attribute.SERIAL_NUMBER: _der_integer(cert.serial_number),
            Attribute.VALUE: der,
            Attribute.CERTIFICATE_CATEGORY: CATEGORY_USER if i == 0 else CATEGORY_AUTHORITY,
        })


def _der_integer(value: int) -> bytes:
    from asn1crypto.core import Integer

    return bytes(Integer(value).dump())


def key_id_of(ws: WorkerSession, label: str) -> bytes | None:
    """CKA_ID of the private key labelled `label`, or None when there is none."""
    keys = ws.search(Pkcs11Uri(object=label), ObjectClass.PRIVATE_KEY)
    if len(keys) > 1:
        raise DuplicateObject(f"{len(keys)} private keys are labelled '{label}'")
    return bytes(keys[0][Attribute.ID]) if keys else None


def import_pkcs12_objects(ws: WorkerSession, label: str, key: PrivateKeyTypes, certs: list[bytes]) -> str:
    _refuse_taken(ws, label)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    key_id = key_id_from_spki(spki)
    import_private_key(ws, label, key, key_id)
    if certs:
        store_certificates(ws, label, key_id, certs)
    return key_id.hex()


def has_certificates(ws: WorkerSession, label: str) -> bool:
    return bool(ws.search(Pkcs11Uri(object=label), ObjectClass.CERTIFICATE))


def delete(ws: WorkerSession, uri: Pkcs11Uri) -> int:
    cls = _CLASS_BY_TYPE.get(uri.type) if uri.type else None
    found = ws.search(uri, cls)
    ws.forget_seen()
    for obj in found:
        obj.destroy()
    ws.clear_cache()
    return len(found)
