"""The renewal fault matrix: every step of a renewal x {an error, a call that outlives its
deadline}, driven through the real orchestration (`renewal`, `dps.Provisioner`, the identity
helpers) over the in-memory key store, DPS and hub of tests/fakes.py. A process killed at each
step is tests/integration/test_renewal.py's test_a_kill_at_any_renewal_step_… (real token, real
emulator).

After each fault: the connection uses a credential that works (complete, issued, valid), the
token holds at most one generation besides it, and the renewal state says what happened; after
the late effects of a hung call have landed the same still holds; and the next attempt without a
fault leaves exactly one generation, the one in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeDps, FakeHub, FakeKeyStore, Faults

from spyrus_hsm.cloud import renewal
from spyrus_hsm.cloud.dps import DpsRequest, Provisioner

BASE = "op"
# step -> (fault name, whether the step comes after the commit point)
STEPS = {
    "key generation": ("generate", False),
    "DPS registration": ("register", False),
    "chain check": ("chain", False),
    "chain store": ("store", False),
    "connection move": ("move", False),
    "certificate-renewed message": ("announce", True),
    "deletion of the old generation": (f"delete:{BASE}", True),
}
MODES = ["error", "hang"]
# A chain is checked in memory: nothing there can outlive a deadline.
MATRIX = [(step, mode) for step in STEPS for mode in MODES if (step, mode) != ("chain check", "hang")]


@dataclass
class Rig:
    faults: Faults
    keys: FakeKeyStore
    dps: FakeDps
    hub: FakeHub
    renewer: renewal.Renewer
    reports: list[dict[str, Any]]

    @property
    def state(self) -> dict[str, Any]:
        return self.reports[-1]

    def others(self) -> list[renewal.Generation]:
        return [g for g in renewal.generations(self.keys, BASE) if g.label != self.hub.using]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    faults = Faults()
    keys = FakeKeyStore(faults)
    dps = FakeDps(faults)
    hub = FakeHub(faults, keys, dps.root)
    keys.import_secret("onboard", b"\x01" * 32)
    provisioner = Provisioner(keys, tmp_path, exchange=dps)
    request = DpsRequest("0ne00FA4E", "dev-1", "dps.example", "symmetricKey", "onboard", issue_cert=BASE)
    provisioner.register(request)  # the first issuance: generation 'op'
    first = renewal.require_current(keys, BASE)
    hub.connect(first)
    reports: list[dict[str, Any]] = []
    renewer = renewal.Renewer(keys, provisioner, request, hub.move, renew_at=0.5,
                              backoff=renewal.retry_backoff(60, 120), timeout=5, tls_dir=tmp_path / "tls",
                              report=reports.append, announce=hub.announce)
    return Rig(faults, keys, dps, hub, renewer.watch(first), reports)


def _assert_usable(rig: Rig) -> None:
    assert rig.hub.credential_works(), (rig.hub.using, renewal.generations(rig.keys, BASE))
    assert rig.renewer.status.label == rig.hub.using  # what the twin says is in use, is
    assert len(rig.others()) <= 1, renewal.generations(rig.keys, BASE)


@pytest.mark.parametrize("step, mode", MATRIX)
def test_a_fault_at_any_step_leaves_a_working_credential_and_a_state_that_says_what_happened(
        rig: Rig, step: str, mode: str) -> None:
    fault, after_commit = STEPS[step]
    rig.faults.arm(fault, mode)
    rig.renewer.attempt()
    assert fault not in rig.faults.armed, f"the renewal never reached the {step}"

    _assert_usable(rig)
    state = rig.state
    if after_commit:  # renewed all the same: the fault is a warning, not a failure
        assert state["state"] == "scheduled" and state["failures"] == 0 and state["error"] is None, state
        assert rig.hub.using == f"{BASE}@2" and state["label"] == f"{BASE}@2"
        assert state["warning"] and ("announced" if fault == "announce" else "not deleted") in state["warning"]
        assert state["nextAttempt"] == state["renewAt"]  # no early retry of a renewal that succeeded
    else:
        said = "not for the requested key" if fault == "chain" else "injected"
        assert state["state"] == "failed" and state["failures"] == 1 and said in state["error"], state
        assert rig.hub.using == BASE and state["label"] == BASE
        assert state["nextAttempt"] > state["lastAttempt"]

    rig.faults.settle()  # what a hung call did after its caller gave up
    _assert_usable(rig)

    renewed_before = rig.dps.issued
    rig.renewer.attempt()  # the next attempt, without a fault
    assert rig.dps.issued == renewed_before + 1
    assert rig.state["state"] == "scheduled" and rig.state["error"] is None and rig.state["warning"] is None
    gens = renewal.generations(rig.keys, BASE)
    assert [(g.label, g.complete) for g in gens] == [(rig.hub.using, True)], gens
    assert rig.hub.credential_works()


def test_a_failed_certificate_renewed_message_never_deletes_the_credential_in_use(rig: Rig) -> None:
    rig.faults.arm("announce", "error")
    rig.renewer.attempt()
    assert rig.hub.using == f"{BASE}@2" and rig.hub.credential_works()
    assert [g.label for g in renewal.generations(rig.keys, BASE)] == [f"{BASE}@2"]
    assert "not announced" in rig.state["warning"] and "dropped the connection" in rig.state["warning"]


def test_a_failed_deletion_after_the_commit_point_is_retried_alone_not_as_a_new_renewal(rig: Rig) -> None:
    rig.faults.arm(f"delete:{BASE}", "error")
    rig.renewer.attempt()
    assert rig.state["state"] == "scheduled" and rig.state["failures"] == 0 and "not deleted" in rig.state["warning"]
    assert [g.label for g in renewal.generations(rig.keys, BASE)] == [BASE, f"{BASE}@2"]
    issued = rig.dps.issued
    rig.renewer.delete_leftovers()  # what the renewal thread does on its next pass
    assert [g.label for g in renewal.generations(rig.keys, BASE)] == [f"{BASE}@2"]
    assert rig.state["warning"] is None and rig.dps.issued == issued  # no second renewal
