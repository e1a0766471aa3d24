"""The one format of instants the module reports (twin, events, renewal state, CLI output):
ISO 8601 in UTC to the second with a "Z", e.g. 2026-12-04T18:45:05Z. One format means equal
instants are equal strings and the earliest is the smallest string."""

from __future__ import annotations

import datetime as dt


def iso(when: dt.datetime, timespec: str = "seconds") -> str:
    """`when` (aware) as 2026-12-04T18:45:05Z (timespec="milliseconds": 2026-12-04T18:45:05.250Z,
    for logs and audit records)."""
    return when.astimezone(dt.UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def parse(text: str) -> dt.datetime:
    """An instant written by `iso` (or with an offset, as older versions wrote), aware."""
    return dt.datetime.fromisoformat(text)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
