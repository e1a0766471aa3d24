"""Writing the token: importing and deriving secret keys, generating key pairs, importing
PKCS#12 keys and certificates, deleting objects.

A write that stores several objects (a key pair, a key with its public half and certificates)
is done when its last object is stored: that is its commit point. A failure before it destroys
the objects the write had made, so no half of a key pair or key without its chain is left on
the token under a label that then reads as taken.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.constants import DEFAULT
from pkcs11.exceptions import PKCS11Error
from pkcs11.types import Object
from pkcs11.util.ec import encode_ec_public_key
from pkcs11.util.rsa import encode_rsa_public_key

from .algorithms import KeyAlgorithm, SignAlgorithm
from .capabilities import HMAC_PROVIDERS, Need, Unsupported
from .encoding import key_id_from_spki
from .errors import DuplicateObject, InvalidInput, OperationFailed
from .reads import order_chain, rsa_spki
from .secret import Secret
from .session import CLASS_BY_TYPE, Template, WorkerSession
from .signing import sign
from .templates import (
    SECRET_KEY_TEMPLATE,
    certificate_template,
    generated_pair_templates,
    software_key_templates,
)
from .uri import Pkcs11Uri

log = logging.getLogger(__name__)


def _refuse_taken(ws: WorkerSession, label: str) -> None:
    taken = ws.search(Pkcs11Uri(object=label), None)
    if taken:
        raise DuplicateObject(
            f"objects labelled '{label}' already exist on token '{ws.token_label}'; "
            f"choose another label or remove them with 'spyrus-hsm delete --label {label}'"
        )


@contextmanager
def _undone_on_failure(ws: WorkerSession, label: str) -> Iterator[list[Object]]:
    """Collects the objects a multi-object write makes; if the write fails before its commit
    point (the end of the block), destroys them again, newest first, and re-raises."""
    made: list[Object] = []
    try:
        yield made
    except BaseException:
        left = 0
        for obj in reversed(made):
            try:
                obj.destroy()
            except PKCS11Error:
                left += 1  # the token went away: the objects stay until it is back
        ws.clear_cache()
        if left:
            log.warning("%d object(s) of the failed write labelled '%s' could not be removed; "
                        "remove them with 'spyrus-hsm delete --label %s'", left, label, label)
        raise


def _create(ws: WorkerSession, made: list[Object], template: Template) -> None:
    made.append(ws.session.create_object(template))


def import_secret_key(ws: WorkerSession, label: str, value: Secret) -> str:
    """Store an HMAC key as a sensitive, non-extractable token object; returns its id (hex)."""
    ws.capabilities.require(Need.HMAC_SHA256, Need.SECRET_IMPORT)
    _refuse_taken(ws, label)
    if len(value) < 16:
        raise InvalidInput("the key is shorter than 16 bytes; Azure primary keys are 32 or 64")
    key_id = secrets.token_bytes(16)
    template = dict(SECRET_KEY_TEMPLATE)
    template.update({Attribute.LABEL: label, Attribute.ID: key_id, Attribute.VALUE: value.reveal(),
                     Attribute.PRIVATE: ws.capabilities.login_required})
    try:
        ws.session.create_object(template)
    except (p11e.TemplateInconsistent, p11e.AttributeValueInvalid, p11e.AttributeTypeInvalid):
        # HMAC signing listed, secret keys not taken (tpm2-pkcs11): no mechanism list tells.
        raise Unsupported(
            f"token '{ws.token_label}' does not store secret keys given to it (C_CreateObject "
            f"refused): SAS keys need a token that signs HMAC-SHA256 and imports secret keys "
            f"({HMAC_PROVIDERS})", public="the HSM token does not support this operation") from None
    return key_id.hex()


def derive_hmac_key(ws: WorkerSession, parent: Pkcs11Uri, message: bytes, label: str) -> str:
    """Store HMAC-SHA256(parent, message) as a new non-extractable key (DPS group enrollment).

    The derived value passes through this process's memory between C_Sign and C_CreateObject
    (PKCS#11 has no portable HMAC key-derivation mechanism); it is wiped right after.
    """
    ws.capabilities.require(Need.HMAC_SHA256, Need.SECRET_IMPORT)
    _refuse_taken(ws, label)
    derived = Secret(sign(ws, parent, SignAlgorithm.HMAC_SHA256, message))
    try:
        return import_secret_key(ws, label, derived)
    finally:
        derived.wipe()


# What python-pkcs11 adds to a key-pair template by itself (CKA_CLASS, the capability flags,
# ...): DEFAULT drops each, so the token gets only what `generated_pair_templates` asks for.
_LIBRARY_DEFAULTS = (Attribute.CLASS, Attribute.KEY_TYPE, Attribute.ID, Attribute.LABEL, Attribute.TOKEN,
                     Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.ENCRYPT, Attribute.DECRYPT,
                     Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN, Attribute.VERIFY, Attribute.DERIVE,
                     Attribute.MODULUS_BITS, Attribute.PUBLIC_EXPONENT)


def only(template: Template) -> Template:
    """`template` for python-pkcs11's generate_keypair, with its own defaults dropped."""
    return {**dict.fromkeys(_LIBRARY_DEFAULTS, DEFAULT), **template}


def generate_keypair(ws: WorkerSession, label: str, algorithm: KeyAlgorithm) -> str:
    """A key pair generated inside the token; the private half never leaves it. Returns id hex.

    The token is asked only for what the key needs and chooses the rest; what it chose is read
    back, and a private key that came out extractable or not sensitive is deleted again."""
    ws.capabilities.require(*Need.to_generate(algorithm))
    _refuse_taken(ws, label)
    temp_id = secrets.token_bytes(20)
    public_template, private_template = generated_pair_templates(
        algorithm, label, temp_id, private=ws.capabilities.login_required)
    key_type, bits = (KeyType.EC, None) if algorithm.is_ec else (KeyType.RSA, 2048)
    with _undone_on_failure(ws, label) as made:
        pub, priv = ws.session.generate_keypair(
            key_type, bits, public_template=only(public_template), private_template=only(private_template))
        made += [pub, priv]
        _refuse_exposed(ws, label, priv)
        spki = bytes(encode_ec_public_key(pub)) if algorithm.is_ec else rsa_spki(encode_rsa_public_key(pub))
        key_id = key_id_from_spki(spki)
        try:
            pub[Attribute.ID] = key_id
            priv[Attribute.ID] = key_id
        except (p11e.AttributeReadOnly, p11e.TemplateInconsistent,
                p11e.AttributeValueInvalid, p11e.FunctionNotSupported):
            # A token that fixes CKA_ID at creation: the random id asked for stays.
            log.info("token '%s' keeps the CKA_ID of key '%s' as generated", ws.token_label, label)
            key_id = bytes(priv[Attribute.ID])
            if bytes(pub[Attribute.ID]) != key_id:
                pub[Attribute.ID] = key_id
    return key_id.hex()


def _refuse_exposed(ws: WorkerSession, label: str, priv: Object) -> None:
    sensitive, extractable = bool(priv[Attribute.SENSITIVE]), bool(priv[Attribute.EXTRACTABLE])
    if extractable or not sensitive:
        raise OperationFailed(
            f"token '{ws.token_label}' generated key '{label}' "
            f"{'extractable' if extractable else 'not sensitive'} although asked otherwise; it was "
            "deleted again: keep identity keys in a token that keeps its keys in")


def import_private_key(ws: WorkerSession, label: str, key: PrivateKeyTypes, key_id: bytes) -> None:
    """Store a software private key (from a PKCS#12) as sensitive, non-extractable."""
    with _undone_on_failure(ws, label) as made:
        _store_private_key(ws, made, label, key, key_id)


def _store_private_key(ws: WorkerSession, made: list[Object], label: str, key: PrivateKeyTypes,
                       key_id: bytes) -> None:
    priv, pub = software_key_templates(label, key, key_id)
    priv[Attribute.PRIVATE] = ws.capabilities.login_required
    _create(ws, made, priv)
    _create(ws, made, pub)


def store_certificates(ws: WorkerSession, label: str, key_id: bytes, ders: list[bytes]) -> None:
    """Store the chain under `label` with the key's CKA_ID: owner first (category user)."""
    with _undone_on_failure(ws, label) as made:
        _store_certificates(ws, made, label, key_id, ders)


def replace_certificates(ws: WorkerSession, label: str, key_id: bytes, ders: list[bytes]) -> int:
    """Store the chain under `label` in place of the certificates there: the new ones first, the
    old ones destroyed after (the commit point is the new chain stored), so an interruption
    leaves the old chain or both, never a key without a certificate. The old objects destroyed."""
    old = ws.search(Pkcs11Uri(object=label), ObjectClass.CERTIFICATE)
    store_certificates(ws, label, key_id, ders)
    ws.forget_seen()
    for obj in old:
        obj.destroy()
    ws.clear_cache()
    return len(old)


def _store_certificates(ws: WorkerSession, made: list[Object], label: str, key_id: bytes,
                        ders: list[bytes]) -> None:
    for i, der in enumerate(order_chain(ders)):
        _create(ws, made, certificate_template(label, key_id, der, owner=i == 0))


def import_pkcs12_objects(ws: WorkerSession, label: str, key: PrivateKeyTypes, certs: list[bytes]) -> str:
    _refuse_taken(ws, label)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    key_id = key_id_from_spki(spki)
    with _undone_on_failure(ws, label) as made:
        _store_private_key(ws, made, label, key, key_id)
        if certs:
            _store_certificates(ws, made, label, key_id, certs)
    return key_id.hex()


def delete(ws: WorkerSession, uri: Pkcs11Uri) -> int:
    cls = CLASS_BY_TYPE.get(uri.type) if uri.type else None
    found = ws.search(uri, cls)
    ws.forget_seen()
    for obj in found:
        obj.destroy()
    ws.clear_cache()
    return len(found)
