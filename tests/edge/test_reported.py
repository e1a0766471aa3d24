"""Reported properties: HSM state, credential inventory, config status and errors — names,
types and dates only, each section complete so it can be sent whole."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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
LEAF_START = LEAF_EXPIRY - dt.timedelta(days=100)  # renewal due (0.8) 20 days before expiry


def obj(label: str, kind: str, key_type: str | None = None, not_after: str | None = None) -> ObjectInfo:
    return ObjectInfo(label, "0a0b", kind, key_type, kind in ("private", "secret-key") or None, False,
                      not_after=not_after)


def x509_credential(label: str, cn: str, not_before: dt.datetime = LEAF_START,
                    not_after: dt.datetime = LEAF_EXPIRY, ca_name: str = "Edge Test CA") -> X509Credential:
    ca = make_ca(ca_name)
    leaf = make_device_cert(ca, cn, not_before=not_before, not_after=not_after)
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
         "commonName": "edge-1", "notAfter": "2031-05-06T07:08:09Z", "issuer": "CN=Edge Test CA",
         "renewAt": "2031-04-16T07:08:09Z", "chainLength": 2},
        {"label": "root-ca", "kind": "certificate", "objects": ["cert"], "keyType": None,
         "notAfter": "2040-01-01T00:00:00Z"},
        {"label": "signer", "kind": "key-pair", "objects": ["private", "public"], "keyType": "RSA"},
    ]


def test_renew_at_is_the_configured_fraction_of_the_lifetime() -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    cred = x509_credential("op", "dev-1", not_before=start, not_after=start + dt.timedelta(days=10))
    objects = [obj("op", "private", "EC"), obj("op", "cert")]
    assert inventory(objects, [cred], renew_at=0.5)[0]["renewAt"] == "2030-01-06T00:00:00Z"
    assert inventory(objects, [cred], renew_at=0.25)[0]["renewAt"] == "2030-01-03T12:00:00Z"


def test_earliest_not_after_is_a_scalar_over_x509_credentials_only() -> None:
    soon, late = dt.datetime(2027, 3, 4, 5, 6, 7, tzinfo=dt.UTC), dt.datetime(2033, 1, 1, tzinfo=dt.UTC)
    objects = [obj(label, kind) for label in ("a-late", "b-soon") for kind in ("private", "cert")]
    objects.append(obj("root-ca", "cert", not_after="2026-01-01T00:00:00+00:00"))  # no key: not a credential
    creds = [x509_credential("a-late", "d1", not_after=late),
             x509_credential("b-soon", "d2", not_before=soon - dt.timedelta(days=30), not_after=soon)]
    section = credentials_section(inventory(objects, creds))
    assert section["earliestNotAfter"] == "2027-03-04T05:06:07Z"
    # a credential beyond the item limit still counts: it is the device that is close to expiry
    assert credentials_section(inventory(objects, creds), limit=1)["earliestNotAfter"] == "2027-03-04T05:06:07Z"
    assert credentials_section(inventory(objects[-1:], []))["earliestNotAfter"] is None
    assert credentials_section([])["earliestNotAfter"] is None


def test_earliest_days_left_counts_whole_days_until_the_earliest_expiry() -> None:
    soon = dt.datetime(2027, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    objects = [obj("b-soon", kind) for kind in ("private", "cert")]
    items = inventory(objects, [x509_credential("b-soon", "d2", not_before=soon - dt.timedelta(days=30),
                                                not_after=soon)])
    for now, days in ((soon - dt.timedelta(days=14, hours=1), 14), (soon - dt.timedelta(days=13, hours=23), 13),
                      (soon - dt.timedelta(seconds=1), 0), (soon + dt.timedelta(hours=1), -1)):
        assert credentials_section(items, now=now)["earliestDaysLeft"] == days, now
    assert credentials_section([])["earliestDaysLeft"] is None


def test_a_long_issuer_is_clipped_for_the_twin() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{i}" + "u" * 60) for i in range(10)])
    leaf = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=dev-1")).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(1).not_valid_before(LEAF_START)
            .not_valid_after(LEAF_EXPIRY).sign(key, hashes.SHA256()))
    cred = X509Credential("op", b"\x0a", "dev-1", (leaf,))
    item = credentials_section(inventory([obj("op", "private", "EC"), obj("op", "cert")], [cred]))["items"][0]
    assert len(item["issuer"]) == 500 and item["issuer"].startswith("OU=9uuu") and item["issuer"].endswith("…")


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
