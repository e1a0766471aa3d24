"""A signature by a key in the HSM, in the form X.509 structures carry it: the algorithm's
name (asn1crypto's) and the DER signature. Shared by CSRs and the certificates the service key
issues, so both sign the same way for each key type."""

from __future__ import annotations

from ..hsm import KeyAlgorithm, SignAlgorithm, ecdsa_raw_to_der
from ..keystore import KeyStore

# key type -> (PKCS#11 mechanism, X.509 signature algorithm, hash name for cryptography)
_SCHEMES: dict[KeyAlgorithm, tuple[SignAlgorithm, str, str]] = {
    KeyAlgorithm.EC_P384: (SignAlgorithm.ECDSA_SHA384, "sha384_ecdsa", "sha384"),
    KeyAlgorithm.EC_P256: (SignAlgorithm.ECDSA_SHA256, "sha256_ecdsa", "sha256"),
    KeyAlgorithm.RSA_2048: (SignAlgorithm.RSA_PKCS1_SHA256, "sha256_rsa", "sha256"),
}


def scheme(algorithm: KeyAlgorithm) -> tuple[SignAlgorithm, str, str]:
    return _SCHEMES.get(algorithm, _SCHEMES[KeyAlgorithm.RSA_2048])


def sign(hsm: KeyStore, label: str, algorithm: KeyAlgorithm, data: bytes) -> tuple[str, bytes]:
    """(signature algorithm name, DER signature) of `data` by the HSM key `label` (blocking:
    call it off the event loop; the pool bounds it with hsm.call_timeout)."""
    mechanism, name, _ = scheme(algorithm)
    signature = hsm.sign(label, mechanism, data)
    if mechanism is not SignAlgorithm.RSA_PKCS1_SHA256:
        signature = ecdsa_raw_to_der(signature)
    return name, signature
