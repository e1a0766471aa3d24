"""The module twin's reported properties (pure functions).

    {"version": "0.1.0",
     "hsm": {"status": "ready", "ready": true, "reason": null, "tokenLabel": "edge",
             "tokenSerial": "…", "recoveries": 0, "restartRequired": false, "lastChange": null},
             (two tokens: also "degraded": null, "tokensReady": 2, "tokens": [{"label": …}, …])
     "credentials": {"count": 2, "truncated": false, "earliestNotAfter": "2026-…", "earliestDaysLeft": 40,
                     "items": [{"label": "edge-id", "kind": "x509", "objects": ["cert", "private", "public"],
                                "keyType": "EC", "commonName": "edge-1", "notAfter": "2026-…",
                                "issuer": "CN=…", "renewAt": "2026-…", "chainLength": 2}, …]},
     "config": {"status": "applied", "desiredVersion": 7, "appliedVersion": 7, "source": "twin", "error": null},
     "lastError": {"source": "config", "message": "…", "time": "…"}}

Labels, types, names and dates only: no key material, PIN or SAS key ever goes in. Every
section always carries all of its keys (null deletes a key in a twin patch), so a section can be
sent whole whenever anything in it changes. Strings are clipped to 500 characters (twin values
have size limits) and the inventory to 100 entries (reported properties are at most 32 KB).
`credentials.earliestNotAfter` is a scalar (the X.509 credential closest to expiry, null when
there is none) so that a fleet query can find devices due for renewal without looking inside
the array; `earliestDaysLeft` is the whole days until then, for queries and deployment metrics
(the hub's query language has no date arithmetic).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .. import times
from ..hsm import HsmState, ObjectInfo
from ..identity.x509 import X509Credential
from ..twinvalues import MAX_TEXT, clip, renewal_entries, twin_key

__all__ = ["MAX_ITEMS", "MAX_TEXT", "clip", "renewal_entries", "twin_key"]  # the last three live in twinvalues

MAX_ITEMS = 100


def hsm_section(state: HsmState) -> dict[str, Any]:
    """The `hsm` section; with two tokens also `degraded`, `tokensReady` and `tokens` (always
    all three while the module runs on two tokens, so a patch can null what went away)."""
    section: dict[str, Any] = {
        "status": state.status, "ready": state.ready, "reason": clip(state.reason), "tokenLabel": state.token_label,
        "tokenSerial": state.token_serial, "recoveries": state.recoveries, "restartRequired": state.restart_required,
        "lastChange": clip(state.last_change)}
    if state.members:
        section.update(degraded=clip(state.degraded), tokensReady=state.tokens_ready,
                       tokens=[{"label": m.token_label, "serial": m.token_serial, "status": m.status,
                                "reason": clip(m.reason)} for m in state.members])
    return section


def inventory(objects: Sequence[ObjectInfo], x509: Sequence[X509Credential],
              renew_at: float = 0.8) -> list[dict[str, Any]]:
    """One entry per label: what kind of credential it is, its object types and key type, and
    for X.509 credentials the leaf's common name, issuer, expiry and renewal instant (when
    `renew_at` of its lifetime has passed); certificates alone: the earliest expiry among them."""
    by_label: dict[str, list[ObjectInfo]] = {}
    for o in objects:
        by_label.setdefault(o.label, []).append(o)
    creds = {c.label: c for c in x509}
    items = []
    for label in sorted(by_label):
        group = by_label[label]
        types = sorted({o.type for o in group})
        key_type = next((o.key_type for o in group if o.type in ("private", "secret-key") and o.key_type), None)
        item: dict[str, Any] = {"label": label, "kind": _kind(types, label in creds), "objects": types,
                                "keyType": key_type}
        cred = creds.get(label)
        if cred is not None:
            leaf = cred.leaf
            start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
            item.update(commonName=cred.common_name, notAfter=times.iso(end), issuer=leaf.issuer.rfc4514_string(),
                        renewAt=times.iso(start + (end - start) * renew_at), chainLength=len(cred.chain))
        else:
            expiries = sorted(o.not_after for o in group if o.not_after)
            if expiries:
                item["notAfter"] = times.iso(dt.datetime.fromisoformat(expiries[0]))
        items.append(item)
    return items


def _kind(types: list[str], is_x509: bool) -> str:
    if is_x509:
        return "x509"
    if "secret-key" in types:
        return "secret-key"
    if "private" in types:
        return "key-pair"
    if "cert" in types:
        return "certificate"
    return types[0] if types else "unknown"


def credentials_section(items: Sequence[Mapping[str, Any]], limit: int = MAX_ITEMS,
                        renewals: Mapping[str, Mapping[str, Any]] | None = None,
                        now: dt.datetime | None = None) -> dict[str, Any]:
    # Over every item, not only those sent: a credential past the limit still expires. The
    # timestamps share one format (times.iso), so the smallest string is the earliest instant.
    items = with_renewal_times(items, renewals or {})
    expiries = [i["notAfter"] for i in items if i.get("kind") == "x509" and i.get("notAfter")]
    earliest = min(expiries, default=None)
    return {"count": len(items), "truncated": len(items) > limit, "earliestNotAfter": earliest,
            "earliestDaysLeft": days_left(earliest, now or dt.datetime.now(dt.UTC)),
            "items": [{k: clip(v) if isinstance(v, str) else v for k, v in i.items()} for i in items[:limit]],
            **renewal_entries(renewals or {})}


def with_renewal_times(items: Sequence[Mapping[str, Any]],
                       renewals: Mapping[str, Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """`items` with the renewAt of each credential being renewed taken from its renewal state,
    so the inventory and `credentials.<label>.renewal` say the same (the renewal's rule also
    knows when the certificate was received: see `cloud.renewal.due_at`)."""
    due = {state.get("label"): state.get("renewAt") for state in renewals.values() if state.get("renewAt")}
    return [{**i, "renewAt": due[i["label"]]} if i.get("label") in due and "renewAt" in i else i for i in items]


def days_left(iso: str | None, now: dt.datetime) -> int | None:
    """Whole days from `now` until the instant `iso` (negative once past). IoT Hub's query
    language cannot do date arithmetic, so a fleet query or a deployment's custom metric
    compares this number (`earliestDaysLeft < 14`); it changes once a day, so the reported
    document is not rewritten at every inventory."""
    if iso is None:
        return None
    when = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return math.floor((when - now).total_seconds() / 86400)


def config_section(status: str, desired_version: int | None, applied_version: int | None,
                   source: str, error: str | None = None) -> dict[str, Any]:
    """status: applied or rejected; source: twin (a desired patch) or file (reloadConfig)."""
    return {"status": status, "desiredVersion": desired_version, "appliedVersion": applied_version,
            "source": source, "error": clip(error)}


def error_entry(source: str, message: str, when: dt.datetime) -> dict[str, Any]:
    return {"source": source, "message": clip(message), "time": times.iso(when)}


def changes(acknowledged: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The patch that brings the acknowledged document to `wanted`: the top-level entries that
    differ, each sent whole (sections always carry all their keys)."""
    return {k: v for k, v in wanted.items() if k not in acknowledged or acknowledged[k] != v}


