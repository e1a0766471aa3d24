"""A whole rollover through the token cache against a saturated serial token, with an injected
clock: refreshes are refused while the token's background queue is full and retried by later
hits, some tokens grow too old and their queued refresh is withdrawn, some successors are
refreshed again before the run ends. Every signature made is still a token some leaf receives,
counting the sweep after the run (the benchmark's accounting of 'tokens needed')."""

from __future__ import annotations

import asyncio
import itertools

from spyrus_hsm.hsm.errors import HsmBusy
from spyrus_hsm.identity.sas import SasToken
from spyrus_hsm.service.cache import Mint, TokenCache

TTL = 100
MIN_LIFE = 25          # cache_min_remaining_fraction 0.25
LEAVES = 60
BACKGROUND_LIMIT = 4   # refreshes the token's queue takes before it refuses more
START = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class SerialToken:
    """The HSM at the cache's boundary: mints wait in one queue, urgent before background, until
    `sign` takes them one at a time. A background mint is refused while BACKGROUND_LIMIT are
    queued; a mint withdrawn (cancelled) while queued is skipped and costs no signature.
    `early` lists the signatures made while the leaf's newest token was still before its reuse
    point (half its life): nothing needed those."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.queue: list[tuple[bool, int, str, asyncio.Future[SasToken]]] = []
        self.order = itertools.count()
        self.signed: list[SasToken] = []
        self.newest: dict[str, SasToken] = {}
        self.early: list[str] = []
        self.refused = 0

    def mint_for(self, uri: str) -> Mint:
        async def mint(background: bool) -> SasToken:
            if background and sum(bg and not f.done() for bg, _, _, f in self.queue) >= BACKGROUND_LIMIT:
                self.refused += 1
                raise HsmBusy("the HSM queue is full")
            fut = asyncio.get_running_loop().create_future()
            self.queue.append((background, next(self.order), uri, fut))
            return await fut
        return mint

    def sign(self, n: int) -> None:
        self.queue = [job for job in sorted(self.queue, key=lambda job: job[:2]) if not job[3].done()]
        for _, _, uri, fut in self.queue[:n]:
            # unique per signature: two tokens made in one second share an expiry, not a name
            token = SasToken(f"{uri}#{len(self.signed)}", uri, int(self.clock()) + TTL)
            newest = self.newest.get(uri)
            if newest is not None and self.clock() < newest.expires_on - TTL / 2:
                self.early.append(token.token)
            self.signed.append(token)
            self.newest[uri] = token
            fut.set_result(token)
        del self.queue[:n]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def key(leaf: int) -> tuple[str, str, None, int]:
    return ("k", f"hub.example/devices/leaf-{leaf}", None, TTL)


def test_every_signature_of_a_saturated_rollover_reaches_a_leaf_by_the_final_sweep() -> None:
    clock = Clock()
    token = SerialToken(clock)
    cache = TokenCache(0.5, clock=clock)

    async def ask(leaf: int) -> SasToken:
        got, _ = await cache.get(key(leaf), TTL, token.mint_for(key(leaf)[1]), MIN_LIFE)
        return got

    async def scenario() -> tuple[set[str], set[str], set[str], int]:
        first: set[str] = set()
        for leaf in range(LEAVES):  # the storm: one new leaf every half second
            clock.now = START + leaf / 2
            asking = asyncio.ensure_future(ask(leaf))
            await settle()
            token.sign(1)
            first.add((await asking).token)
        before = len(token.signed)
        in_run: set[str] = set()
        pending: dict[int, asyncio.Future[SasToken]] = {}

        def collect() -> None:
            for leaf, asking in list(pending.items()):
                if asking.done():
                    in_run.add(asking.result().token)
                    del pending[leaf]

        for second in range(80):  # the rollover: every leaf asks each second; one signature per second
            clock.now = START + LEAVES / 2 + second
            for leaf in range(LEAVES):
                if leaf not in pending:
                    pending[leaf] = asyncio.ensure_future(ask(leaf))
            await settle()
            token.sign(1)
            await settle()
            collect()
        while token.queue or pending:  # what is still queued is signed; then the sweep
            token.sign(1)
            await settle()
            collect()
        sweep = {(await ask(leaf)).token for leaf in range(LEAVES)}
        await settle()  # the sweep's own refreshes are left queued: not part of the run
        return first, in_run, sweep, before

    first, in_run, sweep, before = asyncio.run(scenario())
    made_in_run = {t.token for t in token.signed[before:]}
    # the scenario exercised what it is about
    assert token.refused > 0 and cache.withdrawn > 0 and cache.minted > LEAVES
    handed_new = (in_run | sweep) - first
    assert made_in_run == handed_new
    assert token.early == []
    assert sweep - in_run - first, "some successors reach a leaf only in the sweep"
