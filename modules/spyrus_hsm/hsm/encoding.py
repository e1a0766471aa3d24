"""Pure format conversions used around the HSM: ECDSA r||s <-> DER, key ids."""

from __future__ import annotations

import hashlib

from asn1crypto.algos import DSASignature


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    """PKCS#11 gives ECDSA signatures as r||s; X.509 and TLS want DER SEQUENCE {r, s}."""
    if not raw or len(raw) % 2:
        raise ValueError("raw ECDSA signature must be r||s of equal halves")
    half = len(raw) // 2
    r = int.from_bytes(raw[:half], "big")
    s = int.from_bytes(raw[half:], "big")
    return bytes(DSASignature({"r": r, "s": s}).dump())


def key_id_from_spki(spki_der: bytes) -> bytes:
    """CKA_ID for a key pair: SHA-1 of its SubjectPublicKeyInfo, as many PKCS#11 tools do."""
    return hashlib.sha1(spki_der, usedforsecurity=False).digest()
