"""The memory of a PIN the token refused, kept on the state volume across restarts and processes.

Every C_Login with a wrong PIN spends one of the token's tries; when they are gone the user PIN
is locked and only the SO PIN can unblock it. A module that restarts in a loop, a `selftest`
or a CLI command would each spend another try with the same wrong PIN file. So when the token
refuses a PIN (CKR_PIN_INCORRECT), a salted digest of it is recorded with the token's serial in
`<state_dir>/refused-pins.json` (mode 0600; HMAC-SHA256 under a random salt kept in the same
file: never the PIN), and before any C_Login a PIN recorded as refused by that token is not
tried. A PIN whose content changed is tried again; a successful login (or a PIN change, or an
unblock) clears the token's record. Where the state directory cannot be read or written, that
is said once and the memory stays in the process only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import write_json_atomic
from .secret import Secret

log = logging.getLogger(__name__)

RECORD_NAME = "refused-pins.json"
_KEEP_PER_TOKEN = 16  # refused PINs remembered per token (more than any token's tries)
_warned: set[str] = set()  # state directories already said to be unusable, in this process


@dataclass(frozen=True)
class RefusedPins:
    """The record in `state_dir`; `origin` says where the PIN tried comes from, for messages
    ("in /run/secrets/pin", "given on standard input")."""

    state_dir: Path
    origin: str

    @classmethod
    def for_file(cls, state_dir: str | Path, pin_file: str | Path | None) -> RefusedPins:
        origin = f"in {pin_file}" if pin_file else "given on standard input"
        return cls(Path(state_dir), origin)

    @property
    def path(self) -> Path:
        return self.state_dir / RECORD_NAME

    def refusal(self, serial: str, pin: Secret) -> str | None:
        """Why not to try `pin` on token `serial` ("refused the PIN in F on T; ..."), or None."""
        data = self._read()
        if data is None:
            return None
        digest = _digest(data["salt"], serial, pin)
        for entry in data["refused"]:
            if entry.get("serial") == serial and hmac.compare_digest(str(entry.get("digest")), digest):
                return (f"refused the PIN {self.origin} on {entry.get('at')}; fix the PIN file, or "
                        "unblock the PIN with the SO PIN ('spyrus-hsm token unblock-pin') — not tried "
                        "again, so no PIN try was spent")
        return None

    def refused(self, serial: str, pin: Secret) -> None:
        """The token `serial` refused `pin` (CKR_PIN_INCORRECT): remember it."""
        data = self._read(create=True)
        if data is None:
            return
        at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        entry = {"serial": serial, "digest": _digest(data["salt"], serial, pin), "at": at}
        mine = [e for e in data["refused"] if e.get("serial") == serial and e["digest"] != entry["digest"]]
        others = [e for e in data["refused"] if e.get("serial") != serial]
        data["refused"] = others + mine[-(_KEEP_PER_TOKEN - 1):] + [entry]
        self._write(data)

    def clear(self, serial: str) -> bool:
        """Forget every refused PIN of token `serial` (it accepted a PIN, or has a new one);
        True when there was something to forget."""
        data = self._read()
        if data is None:
            return False
        kept = [e for e in data["refused"] if e.get("serial") != serial]
        if len(kept) == len(data["refused"]):
            return False
        data["refused"] = kept
        if kept:
            self._write(data)
        else:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                self._unusable(f"cannot be removed ({exc.strerror})")
        return True

    def _read(self, create: bool = False) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if _well_formed(data):
                return dict(data)
            self._unusable("is not a refused-PIN record; it will be replaced")
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not JSON"
            self._unusable(f"cannot be read ({reason})")
            if isinstance(exc, OSError):
                return None
        return {"salt": secrets.token_hex(32), "refused": []} if create else None

    def _write(self, data: dict[str, Any]) -> None:
        try:
            write_json_atomic(self.path, data)
        except OSError as exc:
            self._unusable(f"cannot be written ({exc.strerror})")

    def _unusable(self, what: str) -> None:
        key = str(self.path)
        if key in _warned:
            return
        _warned.add(key)
        log.warning("the record of refused PINs %s %s: a refused PIN is remembered by this "
                    "process only, so each restart may spend another PIN try", self.path, what)


def _well_formed(data: Any) -> bool:
    if not (isinstance(data, dict) and isinstance(data.get("salt"), str)
            and isinstance(data.get("refused"), list)
            and all(isinstance(e, dict) for e in data["refused"])):
        return False
    try:
        return len(bytes.fromhex(data["salt"])) >= 16
    except ValueError:
        return False


def _digest(salt: str, serial: str, pin: Secret) -> str:
    return hmac.new(bytes.fromhex(salt), serial.encode() + b"\0" + pin.reveal(), hashlib.sha256).hexdigest()
