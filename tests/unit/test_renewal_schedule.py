"""When a renewal is due and how failed ones back off (pure functions of cloud/renewal.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from spyrus_hsm.cloud.renewal import due_at, generation_of, label_for, retry_backoff

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def _cert(not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "dev")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(not_before).not_valid_after(not_after).sign(key, hashes.SHA256()))


@pytest.mark.parametrize("label, number", [("op", 1), ("op@2", 2), ("op@17", 17), ("op@1", None), ("op@02", None),
                                           ("op@", None), ("op@x", None), ("op2", None), ("other@2", None),
                                           ("op@2@3", None)])
def test_generation_labels(label: str, number: int | None) -> None:
    assert generation_of("op", label) == number
    if number is not None:
        assert label_for("op", number) == label


def test_due_after_the_fraction_of_the_lifetime() -> None:
    cert = _cert(T0, T0 + dt.timedelta(days=30))
    assert due_at(cert, 0.8) == T0 + dt.timedelta(days=24)
    assert due_at(cert, 0.5) == T0 + dt.timedelta(days=15)


def test_a_backdated_certificate_just_received_is_not_due_on_arrival() -> None:
    cert = _cert(T0 - dt.timedelta(minutes=1), T0 + dt.timedelta(seconds=20))  # backdated for clock skew
    assert due_at(cert, 0.5) < T0  # by notBefore alone it would be due already
    assert due_at(cert, 0.5, received=T0) == T0 + dt.timedelta(seconds=10)
    long_lived = _cert(T0 - dt.timedelta(minutes=1), T0 + dt.timedelta(days=30))
    assert due_at(long_lived, 0.8, received=T0) - due_at(long_lived, 0.8) < dt.timedelta(minutes=1)


def test_backoff_doubles_is_capped_jittered_and_honours_retry_after() -> None:
    backoff = retry_backoff(initial=2, cap=30)
    for failures, ceiling in [(1, 2), (2, 4), (3, 8), (4, 16), (5, 30), (12, 30)]:
        delays = [backoff.delay(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (failures, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered
    assert all(backoff.delay(1, retry_after=45) == 45 for _ in range(20))
