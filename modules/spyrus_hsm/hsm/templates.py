"""PKCS#11 attribute templates for the objects this module stores: secret keys, key pairs,
software private keys imported from a PKCS#12, certificates."""

from __future__ import annotations

from asn1crypto.core import Integer, OctetString
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pkcs11 import Attribute, CertificateType, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from .algorithms import CURVE_OIDS, IMPORTABLE_CURVES, KeyAlgorithm
from .errors import InvalidInput
from .reads import CATEGORY_AUTHORITY, CATEGORY_USER
from .session import Template

SECRET_KEY_TEMPLATE: Template = {
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

# What C_GenerateKeyPair is asked for, and nothing more: a token decides the rest itself, and
# some refuse a template that states what they set themselves (tpm2-pkcs11: "User specified
# and TPM specified attr mismatch" for CKA_VERIFY on the public key).
GENERATED_PUBLIC_ATTRIBUTES = frozenset({Attribute.TOKEN, Attribute.LABEL, Attribute.ID})
GENERATED_PUBLIC_EC = frozenset({Attribute.EC_PARAMS})
GENERATED_PUBLIC_RSA = frozenset({Attribute.MODULUS_BITS, Attribute.PUBLIC_EXPONENT})
GENERATED_PRIVATE_ATTRIBUTES = frozenset({Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE,
                                          Attribute.EXTRACTABLE, Attribute.SIGN, Attribute.LABEL,
                                          Attribute.ID})


def generated_pair_templates(algorithm: KeyAlgorithm, label: str, key_id: bytes,
                             private: bool = True) -> tuple[Template, Template]:
    """(public, private) templates for C_GenerateKeyPair: the private half signs and never
    leaves the token; nothing else is asked (see GENERATED_*). `private`: CKA_PRIVATE of the
    private half (False on a token used without C_Login, where a private object cannot be made)."""
    common: Template = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}
    private_template: Template = {**common, Attribute.PRIVATE: private, Attribute.SENSITIVE: True,
                                  Attribute.EXTRACTABLE: False, Attribute.SIGN: True}
    public_template: Template = dict(common)
    if algorithm.is_ec:
        public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(CURVE_OIDS[algorithm])
    else:
        public_template.update({Attribute.MODULUS_BITS: 2048, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"})
    return public_template, private_template


def software_key_templates(label: str, key: PrivateKeyTypes, key_id: bytes) -> tuple[Template, Template]:
    """(private, public) templates that store a software private key (from a PKCS#12) as
    sensitive, non-extractable, and its public half beside it."""
    common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}
    priv: Template = {
        **common, Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
        Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.DERIVE: False,
    }
    pub: Template = {**common, Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                 Attribute.VERIFY: True, Attribute.ENCRYPT: False}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = IMPORTABLE_CURVES.get(key.curve.name)
        if algorithm is None:
            raise InvalidInput(f"EC curve {key.curve.name} is not supported; use P-256 or P-384")
        params = encode_named_curve_parameters(CURVE_OIDS[algorithm])
        point = key.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
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
    return priv, pub


def certificate_template(label: str, key_id: bytes, der: bytes, owner: bool) -> Template:
    """A certificate stored under the key's label and CKA_ID; `owner`: the key owner's own
    (category user), else one of its chain (category authority)."""
    cert = x509.load_der_x509_certificate(der)
    return {
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
        Attribute.SUBJECT: cert.subject.public_bytes(),
        Attribute.ISSUER: cert.issuer.public_bytes(),
        Attribute.SERIAL_NUMBER: bytes(Integer(cert.serial_number).dump()),
        Attribute.VALUE: der,
        Attribute.CERTIFICATE_CATEGORY: CATEGORY_USER if owner else CATEGORY_AUTHORITY,
    }
