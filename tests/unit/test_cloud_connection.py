"""The module's own hub connection (`cloud.connection`) over the in-memory key store, DPS and
hub client of tests/fakes.py: what happens when a step after connecting fails."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from fakes import FakeDps, FakeHubClient, FakeKeyStore, Faults

from spyrus_hsm.cloud import renewal
from spyrus_hsm.cloud.connection import CloudConnection
from spyrus_hsm.cloud.dps import DpsRequest, Provisioner
from spyrus_hsm.config import CloudConfig

BASE = "op"


@pytest.fixture(autouse=True)
def _no_clients_yet() -> None:
    FakeHubClient.made.clear()


def test_a_failed_tidy_after_connecting_leaves_one_client_and_a_running_renewal(tmp_path: Path) -> None:
    faults, keys, dps, cfg = _operational_with_a_leftover(tmp_path)
    assert [g.label for g in renewal.generations(keys, BASE)] == [BASE, f"{BASE}@2"]
    faults.arm(f"delete:{BASE}", "error")  # ... and cannot be deleted after connecting either
    connection = CloudConnection(cfg, keys, tmp_path, lambda: None, lambda: "fake",
                                 hub_factory=FakeHubClient, exchange=dps)
    try:
        connection.run()  # returns once connected (before: raised, and the retry made a second client)
        assert f"delete:{BASE}" not in faults.armed
        assert len(FakeHubClient.made) == 1 and FakeHubClient.made[0].connected
        assert connection.hub is FakeHubClient.made[0]
        assert connection.renewer is not None and connection.renewer.status.label == f"{BASE}@2"
    finally:
        connection.stop()
    assert all(c.closed for c in FakeHubClient.made)


def test_a_start_without_the_registration_cache_never_leaves_the_key_in_use_without_a_certificate(
        tmp_path: Path) -> None:
    """No persisted state_dir: the start registers again and DPS issues a new certificate for the
    label in use. Storing it fails: the label keeps its certificate (before: deleted first, then
    the import failed, and the next start's tidy() deleted the key)."""
    faults = Faults()
    keys = FakeKeyStore(faults)
    dps = FakeDps(faults)
    keys.import_secret("onboard", b"\x03" * 32)
    cfg = CloudConfig(id_scope="0ne00FA4E", registration_id="dev-1", provisioning_host="dps.example",
                      key="onboard", issue_cert=BASE)
    provisioner = Provisioner(keys, tmp_path, exchange=dps)
    request = DpsRequest.onboarding(cfg, None, BASE)
    provisioner.register(request)
    first = keys.certificate_chain(BASE)[0]
    provisioner.result_path(request.registration_id).unlink()  # the state volume was not kept
    faults.arm("store", "error")
    with pytest.raises(Exception, match="injected"):
        provisioner.register(request)
    assert keys.certificate_chain(BASE)[0] == first
    faults.arm(f"delete:{BASE}", "error")  # the new chain stored, the old one not yet deleted
    with pytest.raises(Exception, match="injected"):
        provisioner.register(request)
    assert keys.certificate_chain(BASE)[0] != first  # the new chain is what the key presents
    provisioner.register(request)  # and the next try leaves the new chain alone
    [leaf, *_] = keys.pairs[BASE].certs
    assert leaf != first and first not in keys.pairs[BASE].certs


def _operational_with_a_leftover(tmp_path: Path) -> tuple[Faults, FakeKeyStore, FakeDps, CloudConfig]:
    """'op' renewed to 'op@2' whose deletion of 'op' failed: a restart finds both."""
    faults = Faults()
    keys = FakeKeyStore(faults)
    dps = FakeDps(faults)
    keys.import_secret("onboard", b"\x04" * 32)
    cfg = CloudConfig(id_scope="0ne00FA4E", registration_id="dev-1", provisioning_host="dps.example",
                      key="onboard", issue_cert=BASE)
    provisioner = Provisioner(keys, tmp_path, exchange=dps)
    request = DpsRequest.onboarding(cfg, None, BASE)
    provisioner.register(request)
    faults.arm(f"delete:{BASE}", "error")
    renewal.renew_once(keys, provisioner, request, BASE, lambda cred, a: None, timeout=5)
    return faults, keys, dps, cfg


def test_a_tidy_that_failed_after_connecting_is_retried_by_the_renewal_thread(tmp_path: Path) -> None:
    """Before: the renewer was not told, and 'op' stayed until the next renewal (weeks)."""
    from waiting import wait_for

    faults, keys, dps, cfg = _operational_with_a_leftover(tmp_path)
    faults.arm(f"delete:{BASE}", "error")  # the tidy after connecting fails once
    connection = CloudConnection(replace(cfg, renew_retry_initial=0.2), keys, tmp_path, lambda: None,
                                 lambda: "fake", hub_factory=FakeHubClient, exchange=dps)
    try:
        connection.run()
        assert f"delete:{BASE}" not in faults.armed
        wait_for(lambda: [g.label for g in renewal.generations(keys, BASE)] == [f"{BASE}@2"], 10,
                 "the renewal thread deleting the generation the tidy left")
    finally:
        connection.stop()


def test_a_stop_while_connecting_publishes_no_client_and_starts_no_renewal(tmp_path: Path) -> None:
    """Before: run() returned at the stop, then the connect published its client and started the
    renewal thread after it."""
    _, keys, dps, cfg = _operational_with_a_leftover(tmp_path)
    connection: CloudConnection | None = None

    class StoppedWhileConnecting(FakeHubClient):
        def connect(self) -> FakeHubClient:
            assert connection is not None
            connection.stop()  # the module is stopped while this connect is under way
            return super().connect()

    connection = CloudConnection(cfg, keys, tmp_path, lambda: None, lambda: "fake",
                                 hub_factory=StoppedWhileConnecting, exchange=dps)
    connection.run()
    assert connection.hub is None and connection.renewer is None
    assert len(FakeHubClient.made) == 1 and FakeHubClient.made[0].closed
