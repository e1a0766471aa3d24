"""ECDSA signature format conversions, checked against `cryptography`."""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from spyrus_hsm.hsm.encoding import ecdsa_raw_to_der


@given(st.integers(1, 2**256 - 1), st.integers(1, 2**256 - 1))
def test_raw_and_der_round_trip(r: int, s: int) -> None:
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    der = ecdsa_raw_to_der(raw)
    assert decode_dss_signature(der) == (r, s)


def test_der_from_raw_verifies_with_cryptography() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.sign(b"m", ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    key.public_key().verify(ecdsa_raw_to_der(raw), b"m", ec.ECDSA(hashes.SHA256()))
