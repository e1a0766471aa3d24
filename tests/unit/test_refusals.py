"""The record of refused PINs (hsm.refusals): per token serial, per PIN, cleared per token, and
a damaged record is said once and replaced rather than stopping a login."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spyrus_hsm.hsm import RefusedPins, Secret
from spyrus_hsm.hsm.refusals import RECORD_NAME


def test_a_refusal_holds_for_that_pin_on_that_token_only(tmp_path: Path) -> None:
    record = RefusedPins.for_file(tmp_path, "/run/secrets/pin")
    record.refused("A1", Secret(b"1234"))
    assert "refused the PIN in /run/secrets/pin on " in (record.refusal("A1", Secret(b"1234")) or "")
    assert record.refusal("A1", Secret(b"12345")) is None
    assert record.refusal("B2", Secret(b"1234")) is None


def test_clearing_a_token_keeps_the_others_and_removes_an_empty_record(tmp_path: Path) -> None:
    record = RefusedPins.for_file(tmp_path, None)
    record.refused("A1", Secret(b"1234"))
    record.refused("B2", Secret(b"1234"))
    assert record.clear("A1") and not record.clear("A1")
    assert record.refusal("B2", Secret(b"1234")) is not None
    assert record.clear("B2") and not (tmp_path / RECORD_NAME).exists()


def test_a_damaged_record_is_said_once_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / RECORD_NAME).write_text('{"salt": "zz", "refused": []}')
    record = RefusedPins.for_file(tmp_path, None)
    with caplog.at_level(logging.WARNING):
        assert record.refusal("A1", Secret(b"1234")) is None
        assert record.refusal("A1", Secret(b"1234")) is None
    assert sum("record of refused PINs" in r.getMessage() for r in caplog.records) == 1
    record.refused("A1", Secret(b"1234"))
    assert record.refusal("A1", Secret(b"1234")) is not None
