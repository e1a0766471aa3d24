"""A wrapper that keeps secret bytes out of reprs, logs and tracebacks, and reads PIN files."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO

from .errors import PinFileError


class Secret:
    """Secret bytes (a PIN, a key, a password). `repr` and `str` never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytearray(value)

    def reveal(self) -> bytes:
        """The secret itself: call at the last moment, at the PKCS#11 boundary only."""
        return bytes(self._value)

    def reveal_str(self) -> str:
        return self._value.decode("utf-8")

    def wipe(self) -> None:
        """Overwrite the held copy (Python may keep others; this shortens their life)."""
        for i in range(len(self._value)):
            self._value[i] = 0
        self._value = bytearray()

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    __hash__ = None  # type: ignore[assignment]


def read_secret_file(path: str | os.PathLike[str], what: str = "PIN") -> Secret:
    """Read a secret from a file: one line; the trailing newline is not part of it.

    Refuses a file that others can read, since a PIN there is as good as public.
    """
    p = Path(path)
    try:
        st = p.stat()
        raw = p.read_bytes()
    except FileNotFoundError:
        raise PinFileError(f"{what} file {p} does not exist; create it (mode 0600)") from None
    except PermissionError:
        raise PinFileError(
            f"{what} file {p} is not readable by this user (uid {os.getuid()}); "
            "fix its owner or mode"
        ) from None
    except OSError as exc:
        raise PinFileError(f"{what} file {p} cannot be read: {exc.strerror}") from None
    if st.st_mode & stat.S_IROTH:
        raise PinFileError(f"{what} file {p} is readable by everyone; run: chmod 600 {p}")
    return _secret_from_bytes(raw, f"{what} file {p}")


def read_secret_stream(stream: BinaryIO | None = None, what: str = "PIN") -> Secret:
    """Read one secret line from a stream (stdin by default)."""
    src = stream if stream is not None else sys.stdin.buffer
    line = src.readline()
    return _secret_from_bytes(line, f"{what} from standard input")


def _secret_from_bytes(raw: bytes, where: str) -> Secret:
    value = raw.rstrip(b"\r\n")
    if not value:
        raise PinFileError(f"{where} is empty")
    return Secret(value)
