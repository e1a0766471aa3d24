"""Signing with token keys (HMAC, ECDSA, RSA) and telling a key pair's algorithm."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pkcs11.exceptions as p11e
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.types import Key, SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from .algorithms import CURVE_OIDS, ECDSA_DIGESTS, KeyAlgorithm, SignAlgorithm
from .capabilities import Need
from .errors import InvalidInput
from .session import TYPE_BY_CLASS, WorkerSession, describe, not_named
from .uri import Pkcs11Uri


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
        message = f"the {TYPE_BY_CLASS[cls]} object {describe(uri)} cannot sign"
        raise InvalidInput(message, public=message)
    return obj


# DER DigestInfo prefix of a SHA-256 digest (RFC 8017 9.2), for CKM_RSA_PKCS over a digest made here
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def sign(ws: WorkerSession, uri: Pkcs11Uri, algorithm: SignAlgorithm, data: bytes) -> bytes:
    """Sign with the mechanism the token offers for `algorithm` (see `Capabilities`); refused
    before any call to the token when it offers none."""
    caps = ws.capabilities
    caps.require(Need.to_sign(algorithm))
    if algorithm is SignAlgorithm.HMAC_SHA256:
        return _sign(ws, uri, ObjectClass.SECRET_KEY, data, Mechanism.SHA256_HMAC)
    if algorithm in ECDSA_DIGESTS:
        mechanism = caps.ecdsa_mechanism(algorithm)
        if mechanism is Mechanism.ECDSA:
            # Hash here and sign the digest with CKM_ECDSA: SoftHSM 2.6 has no
            # CKM_ECDSA_SHA256/384, and some modules stub the token's digests.
            data = ECDSA_DIGESTS[algorithm](data).digest()
        return _sign(ws, uri, ObjectClass.PRIVATE_KEY, data, mechanism)
    mechanism = caps.rsa_mechanism(algorithm)
    if mechanism in (Mechanism.RSA_PKCS, Mechanism.RSA_PKCS_PSS):  # raw: the digest made here
        digest = hashlib.sha256(data).digest()
        data = _SHA256_DIGEST_INFO + digest if mechanism is Mechanism.RSA_PKCS else digest
    param = (Mechanism.SHA256, MGF.SHA256, 32) if algorithm is SignAlgorithm.RSA_PSS_SHA256 else None
    return _sign(ws, uri, ObjectClass.PRIVATE_KEY, data, mechanism, param)


def _sign(ws: WorkerSession, uri: Pkcs11Uri, cls: ObjectClass, data: bytes, mechanism: Mechanism | None,
          param: tuple[Mechanism, MGF, int] | None = None) -> bytes:
    if mechanism is None:  # not reached: `require` refused first
        raise InvalidInput("no signing mechanism", public="no signing mechanism")
    return bytes(_retry_stale(ws, lambda: _signer(ws, uri, cls).sign(
        data, mechanism=mechanism, mechanism_param=param)))


def sign_unbound(ws: WorkerSession, uri: Pkcs11Uri, algorithm: SignAlgorithm, data: bytes) -> bytes:
    """`sign`, unless the key is an identity: a private key with a certificate stored beside it
    (an X.509 credential, a DPS-issued certificate, the API's service certificate) signs only
    for the module, never bytes a caller names. Refused as a missing key would be."""
    if algorithm is not SignAlgorithm.HMAC_SHA256 and ws.search(uri, ObjectClass.CERTIFICATE):
        raise not_named(uri, "private", "a certificate is stored beside it (an identity)")
    return sign(ws, uri, algorithm, data)


def _key(ws: WorkerSession, uri: Pkcs11Uri, cls: ObjectClass) -> Key:
    obj = ws.find(uri, cls)
    if not isinstance(obj, Key):
        raise InvalidInput(f"the {TYPE_BY_CLASS[cls]} object {describe(uri)} is not a key")
    return obj


def key_algorithm(ws: WorkerSession, uri: Pkcs11Uri) -> KeyAlgorithm:
    key = _key(ws, uri, ObjectClass.PRIVATE_KEY)
    if key.key_type != KeyType.EC:
        return KeyAlgorithm.RSA_2048
    params = bytes(key[Attribute.EC_PARAMS])
    return next((a for a, oid in CURVE_OIDS.items() if encode_named_curve_parameters(oid) == params),
                KeyAlgorithm.EC_P256)
