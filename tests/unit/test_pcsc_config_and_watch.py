"""`hsm.pcscd` as configuration, and how a missing token is put in reader terms from what pcscd
reports (the decision only; tests/pcsc asks a real pcscd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spyrus_hsm.config import ConfigError, load
from spyrus_hsm.pcsc.scard import Reader, Survey
from spyrus_hsm.pcsc.watch import NO_READER, CardWatch

A, B = "SPYRUS Rosetta USB 00 00", "Other Reader 01 00"


def test_pcscd_defaults_to_none_and_the_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("hsm:\n  token_label: a\n")
    assert load(str(path), env={}).hsm.pcscd == "none"
    path.write_text("hsm:\n  token_label: a\n  pcscd: internal\n")
    assert load(str(path), env={}).hsm.pcscd == "internal"
    assert load(str(path), env={"SPYRUS_HSM_PCSCD": "host"}).hsm.pcscd == "host"


def test_an_unknown_pcscd_mode_names_the_key_and_the_choices(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("hsm:\n  token_label: a\n  pcscd: yes-please\n")
    with pytest.raises(ConfigError, match=r"'hsm.pcscd' must be one of none, internal, host"):
        load(str(path), env={})
    with pytest.raises(ConfigError, match="SPYRUS_HSM_PCSCD"):
        load(None, env={"SPYRUS_HSM_TOKEN_LABEL": "a", "SPYRUS_HSM_PCSCD": "hots"})


class Pcscd:
    """What pcscd answers, set by the test."""

    def __init__(self) -> None:
        self.now = Survey()

    def __call__(self) -> Survey:
        return self.now


@pytest.mark.parametrize("later, reason", [
    (Survey((Reader(A, False), Reader(B, True))), f"card removed from reader '{A}'"),
    (Survey((Reader(B, False),)), f"reader '{A}' is gone: is the token plugged in and passed through?"),
    (Survey(()), NO_READER),
    (Survey(problem="pcscd not reachable at /run/pcscd/pcscd.comm (no socket)"),
     "pcscd not reachable at /run/pcscd/pcscd.comm (no socket)"),
    (Survey((Reader(A, True), Reader(B, False))), None),
])
def test_the_reader_that_held_the_card_is_named(later: Survey, reason: str | None) -> None:
    pcscd = Pcscd()
    watch = CardWatch(pcscd)
    pcscd.now = Survey((Reader(A, True), Reader(B, False)))
    watch.token_ready()
    pcscd.now = later
    assert watch.explain() == reason


def test_before_the_token_was_ever_ready_an_empty_reader_is_said_so() -> None:
    pcscd = Pcscd()
    pcscd.now = Survey((Reader(A, False), Reader(B, False)))
    assert CardWatch(pcscd).explain() == f"no card in any reader ('{A}', '{B}')"
