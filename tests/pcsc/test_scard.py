"""What spyrus-hsm learns from a real pcscd (virtual reader, emulated card): readers and card
presence, which reader lost its card, and what to fix when pcscd is not there; and `selftest`
saying so with `hsm.pcscd: host`."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pcsc_rig import READER, SOCKET, HostPcscd, VirtualCard

from spyrus_hsm.pcsc import scard
from spyrus_hsm.pcsc.watch import CardWatch

pytestmark = pytest.mark.timeout(90)


def test_the_survey_names_every_reader_and_the_one_holding_the_card(host_pcscd: HostPcscd,
                                                                     card: VirtualCard) -> None:
    before = scard.survey()
    assert before.problem is None and READER in [r.name for r in before.readers]
    assert before.with_card == ()
    card.insert()
    assert scard.survey().with_card == (READER,)
    card.pull()
    assert scard.survey().with_card == ()


def test_a_pulled_card_is_explained_by_its_reader(host_pcscd: HostPcscd, card: VirtualCard) -> None:
    watch = CardWatch()
    card.insert()
    watch.token_ready()
    assert watch.explain() is None  # the card is where it was: PKCS#11's reason stands
    card.pull()
    assert watch.explain() == f"card removed from reader '{READER}'"


def test_without_pcscd_the_socket_is_named(host_pcscd: HostPcscd) -> None:
    host_pcscd.kill()  # the socket file stays behind, as after a crash
    problem = CardWatch().explain()
    assert problem is not None and f"pcscd not reachable at {SOCKET}" in problem
    assert scard.survey().problem == problem


def test_polkit_and_missing_readers_have_their_own_advice() -> None:
    assert "access denied by polkit for uid" in scard.explain_code(scard.E_NO_ACCESS)
    assert scard.explain_code(scard.E_NO_READERS_AVAILABLE) == "no reader: is the token plugged in and passed through?"


def selftest_checks(cli: Any, token_env: Any) -> tuple[int, dict[str, Any]]:
    res = cli("selftest", "--json", env=token_env.env(SPYRUS_HSM_PCSCD="host"))
    assert "Traceback" not in res.err, res.err
    return res.code, {c["name"]: c for c in json.loads(res.out)["checks"]}


def test_selftest_reports_the_reader_and_the_card(host_pcscd: HostPcscd, card: VirtualCard, cli: Any,
                                                   token_env: Any) -> None:
    # Only the PC/SC lines: the session's token holds whatever other tests left in it.
    code, checks = selftest_checks(cli, token_env)
    assert code == 1 and checks["pcsc card"]["ok"] is False and "insert the token" in checks["pcsc card"]["detail"]
    card.insert()
    code, checks = selftest_checks(cli, token_env)
    assert READER in checks["pcsc readers"]["detail"] and checks["pcsc readers"]["ok"]
    assert checks["pcsc card"] == {"name": "pcsc card", "ok": True, "detail": f"card in reader '{READER}'",
                                   "warning": False}
    assert checks["pcsc access"]["ok"] and READER in checks["pcsc access"]["detail"]
    assert checks["login"]["ok"]


def test_selftest_names_the_socket_when_pcscd_is_down(host_pcscd: HostPcscd, cli: Any, token_env: Any) -> None:
    host_pcscd.stop()
    code, checks = selftest_checks(cli, token_env)
    assert code == 1 and f"pcscd not reachable at {SOCKET}" in checks["pcsc"]["detail"]
