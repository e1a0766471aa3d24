"""Reading the token: public keys, certificate chains, object listings."""

from __future__ import annotations

from collections.abc import Iterable

import pkcs11.exceptions as p11e
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.types import Object, PublicKey
from pkcs11.util.ec import encode_ec_public_key
from pkcs11.util.rsa import encode_rsa_public_key

from .errors import DuplicateObject, InvalidInput, ObjectNotFound
from .session import CLASS_BY_TYPE, TYPE_BY_CLASS, ObjectInfo, WorkerSession, describe
from .uri import Pkcs11Uri

CATEGORY_USER = 1       # CKA_CERTIFICATE_CATEGORY: the key owner's certificate
CATEGORY_AUTHORITY = 2  # a CA certificate of the chain


def public_key_spki(ws: WorkerSession, uri: Pkcs11Uri) -> bytes:
    """DER SubjectPublicKeyInfo of the key pair named by `uri` (public object or certificate)."""
    pubs = ws.search(uri.with_(type=None), ObjectClass.PUBLIC_KEY)
    if len(pubs) == 1 and isinstance(pubs[0], PublicKey):
        pub = pubs[0]
        if pub.key_type == KeyType.EC:
            return bytes(encode_ec_public_key(pub))
        return rsa_spki(encode_rsa_public_key(pub))
    certs = certificate_chain(ws, uri)
    return x509.load_der_x509_certificate(certs[0]).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def rsa_spki(pkcs1_der: bytes) -> bytes:
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
            f"no certificate {describe(uri)} on token '{ws.token_label}'; "
            "add one with 'spyrus-hsm cert import'",
            public=f"no certificate {describe(uri)}"
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
    cls = CLASS_BY_TYPE.get(type) if type is not None else None
    if type is not None and cls is None:
        raise InvalidInput(f"unknown object type '{type}'; one of {', '.join(CLASS_BY_TYPE)}")
    found = [_info(obj) for obj in ws.search(Pkcs11Uri(object=label), cls)]
    return sorted(found, key=lambda i: (i.label, i.type, i.id_hex))


def _info(obj: Object) -> ObjectInfo:
    cls = obj[Attribute.CLASS]
    label = obj[Attribute.LABEL]
    ident = _id_of(obj).hex()
    kind = TYPE_BY_CLASS.get(cls, str(cls))
    if cls == ObjectClass.CERTIFICATE:
        cert = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
        category = _safe_attr(obj, Attribute.CERTIFICATE_CATEGORY)
        return ObjectInfo(label, ident, kind, None, None, None,
                          subject=cert.subject.rfc4514_string(),
                          not_after=cert.not_valid_after_utc.isoformat(),
                          category={CATEGORY_USER: "user", CATEGORY_AUTHORITY: "authority"}
                          .get(category or 0))
    key_type = obj[Attribute.KEY_TYPE] if cls in TYPE_BY_CLASS and cls != ObjectClass.DATA else None
    sensitive = extractable = None
    if cls in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
        sensitive = bool(obj[Attribute.SENSITIVE])
        extractable = bool(obj[Attribute.EXTRACTABLE])
    return ObjectInfo(label, ident, kind, getattr(key_type, "name", None), sensitive, extractable)


def _id_of(obj: Object) -> bytes:
    """CKA_ID, empty when the object has none (a token that makes no CKA_ID unless asked may
    not have the attribute at all)."""
    try:
        return bytes(obj[Attribute.ID])
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
        return b""


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


def key_id_of(ws: WorkerSession, label: str) -> bytes | None:
    """CKA_ID of the private key labelled `label`, or None when there is none."""
    keys = ws.search(Pkcs11Uri(object=label), ObjectClass.PRIVATE_KEY)
    if len(keys) > 1:
        raise DuplicateObject(f"{len(keys)} private keys are labelled '{label}'")
    return _id_of(keys[0]) if keys else None


def has_certificates(ws: WorkerSession, label: str) -> bool:
    return bool(ws.search(Pkcs11Uri(object=label), ObjectClass.CERTIFICATE))
