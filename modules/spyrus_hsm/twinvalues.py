"""Values as twin documents and upstream events carry them (pure functions, no imports from
the package): strings clipped to a size the hub accepts, labels made valid twin keys, and the
renewal entries both the module twin (`edge`) and the device twin (`cloud`) report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_TEXT = 500


def clip(text: str | None, limit: int = MAX_TEXT) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def twin_key(label: str) -> str:
    """`label` as a twin property name (those may not contain '.', '$' or spaces)."""
    return "".join("_" if ch in ".$ " else ch for ch in label)


def renewal_entries(renewals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`{<label>: {"renewal": state}}` for each operational certificate being renewed, the
    label made a valid twin key."""
    return {twin_key(label): {"renewal": {k: clip(v) if isinstance(v, str) else v for k, v in state.items()}}
            for label, state in renewals.items()}
