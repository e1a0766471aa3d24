"""The signing and key algorithms the HSM layer offers, and the PKCS#11 names behind them."""

from __future__ import annotations

import hashlib
from enum import Enum

P256_OID = "1.2.840.10045.3.1.7"
P384_OID = "1.3.132.0.34"


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


CURVE_OIDS = {KeyAlgorithm.EC_P256: P256_OID, KeyAlgorithm.EC_P384: P384_OID}
# ECDSA with SHA-256 for P-256 and SHA-384 for P-384 (the digest as long as the curve's order,
# as Azure's P-384 CAs and TLS 1.3's signature schemes pair them).
IMPORTABLE_CURVES = {"secp256r1": KeyAlgorithm.EC_P256, "secp384r1": KeyAlgorithm.EC_P384}
ECDSA_DIGESTS = {SignAlgorithm.ECDSA_SHA256: hashlib.sha256, SignAlgorithm.ECDSA_SHA384: hashlib.sha384}

MECHANISM_NAMES = {
    SignAlgorithm.HMAC_SHA256: "CKM_SHA256_HMAC",
    SignAlgorithm.ECDSA_SHA256: "CKM_ECDSA",
    SignAlgorithm.ECDSA_SHA384: "CKM_ECDSA",
    SignAlgorithm.RSA_PKCS1_SHA256: "CKM_SHA256_RSA_PKCS",
    SignAlgorithm.RSA_PSS_SHA256: "CKM_SHA256_RSA_PKCS_PSS",
}
