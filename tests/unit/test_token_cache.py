"""The SAS token cache on its own, with an injected clock: how long a token is reused, which requests
share an entry, and what single-flight does with concurrent and failing mints. (tests/service/
test_cache.py checks single-flight against the real HSM.)"""

from __future__ import annotations

import asyncio

import pytest

from spyrus_hsm.identity.sas import SasToken
from spyrus_hsm.service.cache import TokenCache

TTL = 600
KEY = ("leaf-1", "hub.example/devices/leaf-1", None, TTL)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Minter:
    """Stands in for the HSM signature the cache awaits: each call makes a new, numbered token
    that expires TTL seconds after `clock`'s time when it is made."""

    def __init__(self, gate: asyncio.Event | None = None, error: Exception | None = None,
                 clock: Clock | None = None) -> None:
        self.calls = 0
        self.background: list[bool] = []  # per call: was it a background refresh?
        self.gate = gate
        self.error = error
        self.clock = clock or Clock()

    async def __call__(self, background: bool) -> SasToken:
        self.calls += 1
        self.background.append(background)
        n = self.calls
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return SasToken(f"token-{n}", KEY[1], int(self.clock()) + TTL)


def test_a_token_is_reused_until_the_reuse_fraction_of_its_lifetime_has_passed() -> None:
    clock, mint = Clock(), Minter()
    cache = TokenCache(0.5, clock=clock)
    start = clock.now

    async def scenario() -> list[tuple[str, bool]]:
        seen = []
        for offset in (0, 1, TTL * 0.5 - 1):
            clock.now = start + offset
            token, reused = await cache.get(KEY, TTL, mint)
            seen.append((token.token, reused))
        return seen

    assert asyncio.run(scenario()) == [("token-1", False), ("token-1", True), ("token-1", True)]
    assert mint.calls == 1


async def settle() -> None:
    """Let background tasks (a refresh whose mint is not gated) run to completion."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_past_the_reuse_point_the_token_is_handed_out_and_its_successor_minted_in_the_background() -> None:
    clock = Clock()
    mint = Minter(clock=clock)
    cache = TokenCache(0.5, clock=clock)

    async def scenario() -> list[tuple[str, bool]]:
        seen = [await cache.get(KEY, TTL, mint, min_life=TTL * 0.25)]
        clock.now += TTL * 0.5
        seen.append(await cache.get(KEY, TTL, mint, min_life=TTL * 0.25))
        await settle()
        seen.append(await cache.get(KEY, TTL, mint, min_life=TTL * 0.25))
        return [(token.token, reused) for token, reused in seen]

    assert asyncio.run(scenario()) == [("token-1", False), ("token-1", True), ("token-2", True)]
    assert mint.background == [False, True]


def test_a_token_with_less_than_the_minimum_life_left_is_never_handed_out() -> None:
    clock = Clock()
    mint = Minter(clock=clock)
    cache = TokenCache(0.5, clock=clock)

    async def scenario() -> list[tuple[str, bool, float]]:
        seen = []
        for offset, min_life in ((0, 60), (TTL - 100, 60), (TTL - 100, 120)):
            clock.now = Clock().now + offset
            token, reused = await cache.get(KEY, TTL, mint, min_life=min_life)
            seen.append((token.token, reused, token.expires_on - clock.now))
        return seen

    first, enough, too_little = asyncio.run(scenario())
    assert first[:2] == ("token-1", False)
    assert enough == ("token-1", True, 100)          # 100 s left, the caller needs 60
    assert too_little[:2] == ("token-2", False)      # it needs 120: it waits for a new token
    assert too_little[2] >= 120
    assert mint.background == [False, False]  # the refresh the second request began: cancelled


def test_a_hit_never_waits_for_the_refresh_and_the_refresh_is_single_flight() -> None:
    clock = Clock()
    cache = TokenCache(0.5, clock=clock)

    async def scenario() -> tuple[Minter, list[tuple[str, bool]], int]:
        old, _ = await cache.get(KEY, TTL, Minter(clock=clock))
        clock.now += TTL * 0.6
        slow = Minter(asyncio.Event(), clock=clock)  # the refresh does not finish until set
        hits = [await cache.get(KEY, TTL, slow, min_life=60) for _ in range(5)]
        await settle()
        assert slow.gate is not None
        slow.gate.set()
        await settle()
        after, _ = await cache.get(KEY, TTL, slow, min_life=60)
        return slow, [(t.token, reused) for t, reused in hits], after.expires_on - old.expires_on

    slow, hits, newer_by = asyncio.run(scenario())
    assert hits == [("token-1", True)] * 5
    assert slow.calls == 1 and slow.background == [True]
    assert newer_by == TTL * 0.6  # the successor replaced the old entry


def test_a_request_that_must_wait_cancels_a_queued_refresh_and_mints_at_once() -> None:
    clock = Clock()
    cache = TokenCache(0.5, clock=clock)

    async def scenario() -> tuple[Minter, str, bool]:
        await cache.get(KEY, TTL, Minter(clock=clock))
        clock.now += TTL * 0.6
        mint = Minter(asyncio.Event(), clock=clock)
        await cache.get(KEY, TTL, mint, min_life=60)  # starts the refresh, stuck in the "queue"
        await settle()
        clock.now += TTL * 0.3                         # 60 s left: too little for this caller
        waiting = asyncio.ensure_future(cache.get(KEY, TTL, mint, min_life=120))
        await settle()
        assert mint.gate is not None
        mint.gate.set()
        token, reused = await waiting
        return mint, token.token, reused

    mint, token, reused = asyncio.run(scenario())
    assert mint.background == [True, False]
    assert (token, reused) == ("token-2", False)


def test_a_failed_refresh_keeps_the_old_token_and_is_tried_again() -> None:
    clock = Clock()
    cache = TokenCache(0.5, clock=clock)

    async def scenario() -> list[int]:
        await cache.get(KEY, TTL, Minter(clock=clock))
        clock.now += TTL * 0.6
        failing = Minter(error=RuntimeError("the HSM said no"), clock=clock)
        first, _ = await cache.get(KEY, TTL, failing, min_life=60)
        await settle()
        working = Minter(clock=clock)
        second, _ = await cache.get(KEY, TTL, working, min_life=60)
        await settle()
        third, _ = await cache.get(KEY, TTL, working, min_life=60)
        assert failing.calls == 1 and working.background == [True]
        return [t.expires_on - int(Clock().now) for t in (first, second, third)]

    # the old token until the retried refresh's successor (made 0.6 TTL later) replaces it
    assert asyncio.run(scenario()) == [TTL, TTL, TTL + int(TTL * 0.6)]


def test_reuse_fraction_zero_mints_every_time() -> None:
    mint = Minter()
    cache = TokenCache(0.0, clock=Clock())

    async def scenario() -> None:
        for _ in range(3):
            await cache.get(KEY, TTL, mint)

    asyncio.run(scenario())
    assert mint.calls == 3


@pytest.mark.parametrize("other", [
    ("leaf-1", "hub.example/devices/leaf-1", None, 900),           # another TTL
    ("leaf-2", "hub.example/devices/leaf-2", None, TTL),           # another device
    ("leaf-1", "hub.example/devices/leaf-1/modules/m", None, TTL),  # another resource
    ("leaf-1", "hub.example/devices/leaf-1", "registration", TTL),  # another key name
], ids=["ttl", "device", "resource", "key name"])
def test_requests_that_differ_are_separate_entries(other: tuple[object, ...]) -> None:
    mint = Minter()
    cache = TokenCache(0.5, clock=Clock())

    async def scenario() -> tuple[str, str]:
        first, _ = await cache.get(KEY, TTL, mint)
        second, reused = await cache.get(other, TTL, mint)
        assert not reused
        return first.token, second.token

    assert asyncio.run(scenario()) == ("token-1", "token-2")


def test_concurrent_identical_requests_share_one_mint() -> None:
    cache = TokenCache(0.0, clock=Clock())  # no reuse: only single-flight can join them

    async def scenario() -> tuple[Minter, list[tuple[SasToken, bool]]]:
        mint = Minter(asyncio.Event())
        waiting = [asyncio.ensure_future(cache.get(KEY, TTL, mint)) for _ in range(10)]
        await asyncio.sleep(0)  # every request is now waiting on the one mint
        assert mint.gate is not None
        mint.gate.set()
        return mint, await asyncio.gather(*waiting)

    mint, results = asyncio.run(scenario())
    assert mint.calls == 1
    assert {token.token for token, _ in results} == {"token-1"}
    assert [shared for _, shared in results] == [False] + [True] * 9


def test_a_failed_mint_is_shared_by_its_waiters_but_not_cached() -> None:
    cache = TokenCache(0.5, clock=Clock())

    async def scenario() -> tuple[list[BaseException | tuple[SasToken, bool]], str]:
        failing = Minter(asyncio.Event(), error=RuntimeError("the HSM said no"))
        waiting = [asyncio.ensure_future(cache.get(KEY, TTL, failing)) for _ in range(3)]
        await asyncio.sleep(0)
        assert failing.gate is not None
        failing.gate.set()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert failing.calls == 1
        retry, _ = await cache.get(KEY, TTL, Minter())
        return outcomes, retry.token

    outcomes, retried = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert retried == "token-1"


def test_a_caller_that_goes_away_does_not_cancel_the_mint_others_wait_for() -> None:
    cache = TokenCache(0.5, clock=Clock())

    async def scenario() -> str:
        mint = Minter(asyncio.Event())
        impatient = asyncio.ensure_future(cache.get(KEY, TTL, mint))
        patient = asyncio.ensure_future(cache.get(KEY, TTL, mint))
        await asyncio.sleep(0)
        impatient.cancel()
        assert mint.gate is not None
        mint.gate.set()
        token, _ = await patient
        return token.token

    assert asyncio.run(scenario()) == "token-1"


def test_the_least_recently_used_entry_is_dropped_beyond_max_entries() -> None:
    mint = Minter()
    cache = TokenCache(0.5, clock=Clock(), max_entries=2)
    a, b, c = (("k", f"uri-{n}", None, TTL) for n in "abc")

    async def scenario() -> None:
        for key in (a, b, a, c):  # a is used again after b: b is the least recently used
            await cache.get(key, TTL, mint)
        assert (await cache.get(a, TTL, mint))[1]
        assert not (await cache.get(b, TTL, mint))[1]

    asyncio.run(scenario())
