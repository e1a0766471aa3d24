"""Reported properties: HSM state, credential inventory, config status and errors — names,
types and dates only, each section complete so it can be sent whole."""

from __future__ import annotations

import datetime as dt

from emulator.pki import make_ca, make_device_cert
from spyrus_hsm.edge.reported import (
    changes,
    clip,
    config_section,
    credentials_section,
    error_entry,
    hsm_section,
    inventory,
)
from spyrus_hsm.hsm import HsmState, ObjectInfo
from spyrus_hsm.identity.x509 import X509Credential

LEAF_EXPIRY = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)


def obj(label: str, kind: str, key_type: str | None = None, not_after: str | None = None) -> ObjectInfo:
    return ObjectInfo(label, "0a0b", kind, key_type, kind in ("private", "secret-key") or None, False,
                      not_after=not_after)


def x509_credential(label: str, cn: str) -> X509Credential:
    ca = make_ca("Edge Test CA")
    leaf = make_device_cert(ca, cn, not_after=LEAF_EXPIRY)
    return X509Credential(label, b"\x0a\x0b", cn, (leaf.cert, ca.cert))


def test_hsm_section_ready() -> None:
    state = HsmState("ready", None, "edge", "0123abcd", recoveries=2)
    assert hsm_section(state) == {"status": "ready", "ready": True, "reason": None, "tokenLabel": "edge",
                                  "tokenSerial": "0123abcd", "recoveries": 2, "restartRequired": False,
                                  "lastChange": None}


def test_hsm_section_not_ready_carries_the_reason() -> None:
    reason = "token with label 'edge' not found; tokens present: none"
    section = hsm_section(HsmState("degraded", reason))
    assert section["ready"] is False and section["status"] == "degraded" and section["reason"] == reason


def test_inventory_has_one_entry_per_label_with_its_kind() -> None:
    objects = [obj("dev-key", "secret-key", "GENERIC_SECRET"),
               obj("edge-id", "private", "EC"), obj("edge-id", "public", "EC"),
               obj("edge-id", "cert", not_after="2031-05-06T07:08:09+00:00"),
               obj("edge-id", "cert", not_after="2035-01-01T00:00:00+00:00"),
               obj("signer", "private", "RSA"), obj("signer", "public", "RSA"),
               obj("root-ca", "cert", not_after="2040-01-01T00:00:00+00:00")]
    items = inventory(objects, [x509_credential("edge-id", "edge-1")])
    assert items == [
        {"label": "dev-key", "kind": "secret-key", "objects": ["secret-key"], "keyType": "GENERIC_SECRET"},
        {"label": "edge-id", "kind": "x509", "objects": ["cert", "private", "public"], "keyType": "EC",
         "commonName": "edge-1", "notAfter": "2031-05-06T07:08:09Z", "chainLength": 2},
        {"label": "root-ca", "kind": "certificate", "objects": ["cert"], "keyType": None,
         "notAfter": "2040-01-01T00:00:00Z"},
        {"label": "signer", "kind": "key-pair", "objects": ["private", "public"], "keyType": "RSA"},
    ]


def test_a_large_inventory_is_truncated_with_the_full_count() -> None:
    items = [{"label": f"k{i:03}", "kind": "secret-key"} for i in range(150)]
    section = credentials_section(items)
    assert (section["count"], section["truncated"], len(section["items"])) == (150, True, 100)
    assert credentials_section(items[:3])["truncated"] is False


def test_config_section_always_has_every_key() -> None:
    assert config_section("applied", 4, 4, "twin") == {
        "status": "applied", "desiredVersion": 4, "appliedVersion": 4, "source": "twin", "error": None}
    rejected = config_section("rejected", 5, 4, "twin", "bad")
    assert rejected["error"] == "bad" and rejected["appliedVersion"] == 4


def test_long_messages_are_clipped_for_the_twin() -> None:
    entry = error_entry("config", "x" * 2000, dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    assert len(entry["message"]) == 500 and entry["message"].endswith("…")
    assert entry["time"] == "2025-01-02T03:04:05Z"
    assert clip(None) is None and clip("short") == "short"


def test_changes_sends_only_the_sections_that_differ() -> None:
    acked = {"version": "0.1.0", "hsm": {"ready": False, "reason": "gone"}}
    wanted = {"version": "0.1.0", "hsm": {"ready": True, "reason": None}, "lastError": None}
    assert changes(acked, wanted) == {"hsm": {"ready": True, "reason": None}, "lastError": None}
    assert changes(wanted, wanted) == {}
