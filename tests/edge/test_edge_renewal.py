"""Under IoT Edge, the operational certificate's renewal is reported in the module twin
(`credentials.<label>.renewal`) and `cloud.renewAt` is set from the twin's desired properties."""

from __future__ import annotations

import datetime as dt
from typing import Any

import addresses
import pytest
from cloud_harness import sas_enrollment
from edge_harness import MODULE

from spyrus_hsm.edge.reported import twin_key

pytestmark = pytest.mark.timeout(120)
CLOUD = addresses.host()


def _renewal(doc: dict[str, Any], base: str) -> dict[str, Any]:
    return dict(((doc.get("credentials") or {}).get(twin_key(base)) or {}).get("renewal") or {})


def test_the_module_twin_reports_renewal_and_sets_renew_at(
        hsm, site, module_site, make_emulator, emulator_pki, label) -> None:  # type: ignore[no-untyped-def]
    reg, base = "er-" + label, label + ".op"  # a '.' is not allowed in a twin key: reported as '_'
    cloud = make_emulator(CLOUD)  # the module's own identity: DPS and its IoT Hub, not edgeHub
    sas_enrollment(hsm, cloud, reg, label, CLOUD)
    cloud.issued_validity = 600
    ms = module_site()
    ms.document["cloud"] = {"id_scope": cloud.id_scope, "registration_id": reg, "provisioning_host": CLOUD,
                            "server_ca_file": str(emulator_pki.ca_file), "attestation": "symmetricKey",
                            "key": label, "issue_cert": base, "renew_at": 0.5}
    ms.write_config()
    ms.start()
    doc = site.wait_reported(lambda r: _renewal(r, base).get("state") == "scheduled", timeout=60)
    first = _renewal(doc, base)
    assert first["label"] == base and first["failures"] == 0
    scheduled = dt.datetime.fromisoformat(first["nextAttempt"])
    assert dt.timedelta(seconds=240) < scheduled - dt.datetime.now(dt.UTC) < dt.timedelta(seconds=310)

    version = site.patch({"cloud": {"renewAt": 2}})
    config = site.wait_config(version)
    assert config["status"] == "rejected" and "cloud.renewAt" in config["error"]

    version = site.patch({"cloud": {"renewAt": 0.01}})  # due 6 s after issuance: renewed now
    assert site.wait_config(version)["status"] == "applied"
    doc = site.wait_reported(lambda r: _renewal(r, base).get("label") == f"{base}@2"
                             and _renewal(r, base).get("state") == "scheduled", timeout=60)
    assert _renewal(doc, base)["lastSuccess"]
    renewed = [t.json() for t in list(cloud.received.telemetry)
               if t.device_id == reg and t.properties.get("type") == "certificate-renewed"]
    assert [r["label"] for r in renewed][:1] == [f"{base}@2"]
    site.emu.wait_for(lambda: any(r.module_id == MODULE and r.properties.get("type") == "certificate.renewed"
                                  for r in list(site.emu.received.telemetry)), timeout=20)
    upstream = [r.json() for r in list(site.emu.received.telemetry)
                if r.module_id == MODULE and r.properties.get("$.on") == "events"
                and r.properties.get("type") == "certificate.renewed"]
    assert upstream[0]["label"] == f"{base}@2" and upstream[0]["previousNotAfter"]
    items = {i["label"]: i for i in doc["credentials"]["items"]}
    assert f"{base}@2" in items and base not in items  # the old generation is gone from the inventory too
