"""Writing files so a reader (or a crash) sees the old content or the new, never a mix."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o644,
                 owner: tuple[int, int] | None = None) -> Path:
    """Write via a temporary file in the same directory, fsync, rename, fsync the directory.
    `owner` (uid, gid): the new file's, set before the rename (a replaced secret keeps its owner)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def write_json_atomic(path: str | os.PathLike[str], value: Any) -> Path:
    return write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n", mode=0o600)


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """The JSON in `path`, or None when it does not exist."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
