"""SAS token cache with single-flight and refresh-ahead.

Identical requests (same key, resource URI, key name and TTL) share one HSM signature while it
is being made. A cached token's life has three parts:

- fresh: until `reuse_fraction` of its lifetime has passed it is handed out as it is;
- refresh-ahead: after that, while it still has the caller's minimum remaining life
  (`min_life`), it is still handed out at once, and its successor is signed in the background
  (one per entry, at the HSM's background priority) and replaces it when ready;
- too old: a caller that needs more life than it has waits for a new signature.

So a token handed out always has at least `min_life` seconds left. A cache hit never waits:
the background signature is started in a task of its own, after the hit has been answered.
Failures are shared by the requests that waited for them but never cached (a failed refresh is
dropped: the next hit tries again). A caller that goes away does not cancel the signature the
others are waiting for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from ..identity.sas import SasToken

log = logging.getLogger(__name__)
MAX_ENTRIES = 50_000
# mint(background): makes a new token; background=True when nobody waits for it.
Mint = Callable[[bool], Awaitable[SasToken]]


@dataclass(frozen=True, slots=True)
class _Entry:
    token: SasToken
    reuse_until: float
    expires_on: int  # the token's, kept here: the hit path reads it on every request


class TokenCache:
    def __init__(self, reuse_fraction: float, clock: Callable[[], float] = time.time,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.reuse_fraction = reuse_fraction
        self.clock = clock
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._inflight: dict[Hashable, asyncio.Task[SasToken]] = {}
        self._refreshing: dict[Hashable, asyncio.Task[None]] = {}
        self.waiting = 0  # requests awaiting a signature in flight (observable, e.g. by tests)
        # What refresh-ahead did (observable, e.g. by the benchmark): successors stored,
        # refreshes that failed (e.g. refused: the HSM queue was half full), refreshes
        # withdrawn for a request that could not wait, and tokens minted while a caller waited.
        self.refreshed = self.refresh_failures = self.withdrawn = self.minted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    async def get(self, key: Hashable, ttl: int, mint: Mint, min_life: float = 0.0) -> tuple[SasToken, bool]:
        """(token, True if no new signature was made for this request). The token has at least
        `min_life` seconds left."""
        entry = self._entries.get(key)
        if entry is not None:
            now = self.clock()
            if entry.expires_on - now >= min_life:
                self._entries.move_to_end(key)
                if now >= entry.reuse_until:
                    self._refresh_ahead(key, ttl, mint)
                return entry.token, True
        task = self._inflight.get(key)
        shared = task is not None
        if task is None:
            # A refresh of this entry may still be queued behind other requests: this caller
            # cannot wait for it, so it is cancelled (it is skipped unless already signing).
            refresh = self._refreshing.pop(key, None)
            if refresh is not None:
                refresh.cancel()
                self.withdrawn += 1
            task = asyncio.ensure_future(self._mint(key, ttl, mint, background=False))
            self._inflight[key] = task
        self.waiting += 1
        try:
            return await asyncio.shield(task), shared
        finally:
            self.waiting -= 1

    def _refresh_ahead(self, key: Hashable, ttl: int, mint: Mint) -> None:
        if key not in self._refreshing and key not in self._inflight:
            self._refreshing[key] = asyncio.ensure_future(self._refresh(key, ttl, mint))

    async def _refresh(self, key: Hashable, ttl: int, mint: Mint) -> None:
        try:
            await self._mint(key, ttl, mint, background=True)
            self.refreshed += 1
        except Exception as exc:  # nobody waits for it: the next hit tries again
            self.refresh_failures += 1
            log.debug("refreshing a cached token failed: %s", exc)
        finally:
            if self._refreshing.get(key) is asyncio.current_task():
                del self._refreshing[key]

    async def _mint(self, key: Hashable, ttl: int, mint: Mint, background: bool) -> SasToken:
        try:
            token = await mint(background)
            self.minted += not background
            if self.reuse_fraction > 0:
                # From the token's own expiry: a refresh may have waited in the HSM queue.
                reuse_until = token.expires_on - (1.0 - self.reuse_fraction) * ttl
                self._entries[key] = _Entry(token, reuse_until, token.expires_on)
                self._entries.move_to_end(key)
                if len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            return token
        finally:
            if not background and self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]
