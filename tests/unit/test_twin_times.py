"""The twin's instants: one format everywhere, and one renewAt for a credential being renewed
(the inventory's agrees with the renewal state's, which nextAttempt follows)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fakes import FakeDps, FakeKeyStore, Faults

from spyrus_hsm.cloud import renewal
from spyrus_hsm.cloud.dps import DpsRequest, Provisioner
from spyrus_hsm.edge import reported as rep
from spyrus_hsm.identity import x509 as x509_id

INSTANT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
BASE = "op"


def _instants(document: Any, path: str = "") -> dict[str, str]:
    """Every string in `document` that looks like a date, by its path."""
    if isinstance(document, dict):
        return {k: v for key, value in document.items() for k, v in _instants(value, f"{path}.{key}").items()}
    if isinstance(document, list):
        return {k: v for n, value in enumerate(document) for k, v in _instants(value, f"{path}[{n}]").items()}
    return {path: document} if isinstance(document, str) and re.match(r"^\d{4}-\d\d-\d\dT", document) else {}


def test_a_just_received_certificate_has_one_renew_at_in_the_twin_in_one_time_format(tmp_path: Path) -> None:
    faults = Faults()
    keys = FakeKeyStore(faults)
    dps = FakeDps(faults, validity=20)  # backdated a minute, as the emulator and real issuers do
    keys.import_secret("onboard", b"\x03" * 32)
    provisioner = Provisioner(keys, tmp_path, exchange=dps)
    request = DpsRequest("0ne00FA4E", "dev-1", "dps.example", "symmetricKey", "onboard", issue_cert=BASE)
    provisioner.register(request)
    cred = renewal.require_current(keys, BASE)
    reports: list[dict[str, Any]] = []
    renewer = renewal.Renewer(keys, provisioner, request, lambda c, a: None, renew_at=0.5,
                              backoff=renewal.retry_backoff(), timeout=5, tls_dir=tmp_path, report=reports.append)
    renewer.watch(cred, received=renewal.now())
    state = renewer.status.to_twin()
    state["nextAttempt"] = renewal.times.iso(renewer.next_attempt())

    items = rep.inventory(keys.list_objects(), x509_id.credentials(keys), renew_at=0.5)
    section = rep.credentials_section(items, renewals={BASE: state})

    item = next(i for i in section["items"] if i["label"] == BASE)
    renewal_state = section[rep.twin_key(BASE)]["renewal"]
    assert item["renewAt"] == renewal_state["renewAt"] == renewal_state["nextAttempt"], (item, renewal_state)
    instants = _instants(section)
    assert instants and all(INSTANT.match(v) for v in instants.values()), instants
