"""Why the token is missing, in PC/SC terms: "card removed from reader X" rather than
CKR_TOKEN_NOT_PRESENT.

The reader that held the card while the HSM was ready is remembered, so that its card going
away is named even when another reader (an empty one, a second slot) is still there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .scard import Survey, survey

NO_READER = "no reader: is the token plugged in and passed through?"


class CardWatch:
    def __init__(self, ask: Callable[[], Survey] = survey) -> None:
        self._ask = ask
        self._lock = threading.Lock()
        self._readers: tuple[str, ...] = ()  # held the card when the HSM was last ready

    @property
    def readers(self) -> tuple[str, ...]:
        return self._readers

    def token_ready(self) -> None:
        """The HSM is ready: remember which reader(s) hold a card."""
        found = self._ask().with_card
        if found:
            with self._lock:
                self._readers = found

    def explain(self) -> str | None:
        """What PC/SC says about a missing token, or None when a card is where it was (then the
        PKCS#11 reason stands: a wrong PIN, a token not initialised, …)."""
        s = self._ask()
        if s.problem:
            return s.problem
        if not s.readers:
            return NO_READER
        names = {r.name for r in s.readers}
        with self._lock:
            known = self._readers
        for reader in known:
            if reader not in names:
                return f"reader '{reader}' is gone: is the token plugged in and passed through?"
            if reader not in s.with_card:
                return f"card removed from reader '{reader}'"
        if not s.with_card:
            return "no card in any reader (" + ", ".join(f"'{r.name}'" for r in s.readers) + ")"
        return None
