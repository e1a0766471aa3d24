"""SAS token cache with single-flight.

Identical requests (same key, resource URI, key name and TTL) share one HSM signature while it
is being made, and the token is handed out again until `reuse_fraction` of its lifetime has
passed — so a caller always gets at least (1 - reuse_fraction) of the lifetime it asked for.
Failures are shared by the requests that waited for them but never cached. A caller that goes
away does not cancel the signature the others are waiting for.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from ..identity.sas import SasToken

MAX_ENTRIES = 50_000


@dataclass(frozen=True)
class _Entry:
    token: SasToken
    reuse_until: float


class TokenCache:
    def __init__(self, reuse_fraction: float, clock: Callable[[], float] = time.time,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.reuse_fraction = reuse_fraction
        self.clock = clock
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._inflight: dict[Hashable, asyncio.Task[SasToken]] = {}
        self.waiting = 0  # requests awaiting a signature in flight (observable, e.g. by tests)

    def clear(self) -> None:
        self._entries.clear()

    async def get(self, key: Hashable, ttl: int, mint: Callable[[], Awaitable[SasToken]]) -> tuple[SasToken, bool]:
        """(token, True if no new signature was made for this request)."""
        entry = self._entries.get(key)
        if entry is not None:
            if self.clock() < entry.reuse_until:
                self._entries.move_to_end(key)
                return entry.token, True
            del self._entries[key]
        task = self._inflight.get(key)
        shared = task is not None
        if task is None:
            task = asyncio.ensure_future(self._mint(key, ttl, mint))
            self._inflight[key] = task
        self.waiting += 1
        try:
            return await asyncio.shield(task), shared
        finally:
            self.waiting -= 1

    async def _mint(self, key: Hashable, ttl: int, mint: Callable[[], Awaitable[SasToken]]) -> SasToken:
        try:
            started = self.clock()
            token = await mint()
            if self.reuse_fraction > 0:
                self._entries[key] = _Entry(token, started + self.reuse_fraction * ttl)
                if len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            return token
        finally:
            del self._inflight[key]
