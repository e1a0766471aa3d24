"""Signing with token keys (HMAC, ECDSA, RSA) and telling a key pair's algorithm."""

from __future__ import annotations

from collections.abc import Callable

import pkcs11.exceptions as p11e
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.types import Key, SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from .algorithms import CURVE_OIDS, ECDSA_DIGESTS, KeyAlgorithm, SignAlgorithm
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


def sign(ws: WorkerSession, uri: Pkcs11Uri, algorithm: SignAlgorithm, data: bytes) -> bytes:
    if algorithm is SignAlgorithm.HMAC_SHA256:
        return bytes(_retry_stale(ws, lambda: _signer(ws, uri, ObjectClass.SECRET_KEY).sign(
            data, mechanism=Mechanism.SHA256_HMAC)))
    if algorithm in ECDSA_DIGESTS:
        # SoftHSM 2.6 has no CKM_ECDSA_SHA256/384: hash here, sign the digest with CKM_ECDSA.
        digest = ECDSA_DIGESTS[algorithm](data).digest()
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
