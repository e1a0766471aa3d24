"""The fault shim's control file (tests/p11shim): replaced atomically, as the shim requires (a
truncate-then-write can be read half-way)."""

from __future__ import annotations

import os
from pathlib import Path


def write_control(path: Path, **settings: object) -> None:
    """`key=value` lines for `settings` (none: plugged, no faults), written to a temporary file
    renamed over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in settings.items()) or "state=plugged\n")
    os.replace(tmp, path)
