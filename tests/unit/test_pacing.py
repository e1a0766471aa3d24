"""The request pacer: at most `per_iteration` requests start in one event-loop iteration, in
order of arrival, and none waits when fewer arrive."""

from __future__ import annotations

import asyncio

from spyrus_hsm.service.pacing import Pacer


async def _iteration_of_each_start(pacer: Pacer, arrivals: int) -> list[int]:
    """Start `arrivals` requests at once; the loop iteration in which each one got its turn."""
    iteration = 0
    counting = True

    def tick() -> None:
        nonlocal iteration
        iteration += 1
        if counting:
            asyncio.get_running_loop().call_soon(tick)

    asyncio.get_running_loop().call_soon(tick)
    started: list[tuple[int, int]] = []

    async def request(n: int) -> None:
        await pacer.turn()
        started.append((n, iteration))

    await asyncio.gather(*(request(n) for n in range(arrivals)))
    counting = False
    assert [n for n, _ in started] == list(range(arrivals))  # in order of arrival
    return [it for _, it in started]


def test_a_burst_starts_a_few_requests_per_iteration_in_arrival_order() -> None:
    pacer = Pacer(4)
    iterations = asyncio.run(_iteration_of_each_start(pacer, 20))
    per_iteration = {it: iterations.count(it) for it in iterations}
    assert max(per_iteration.values()) == 4
    assert len(per_iteration) == 5  # 20 requests over 5 iterations
    assert pacer.delayed == 16


def test_requests_below_the_rate_never_wait() -> None:
    pacer = Pacer(4)
    iterations = asyncio.run(_iteration_of_each_start(pacer, 4))
    assert len(set(iterations)) == 1
    assert pacer.delayed == 0


def test_a_cancelled_waiter_gives_its_turn_to_the_next() -> None:
    async def scenario() -> list[str]:
        pacer = Pacer(1)
        done: list[str] = []

        async def request(name: str) -> None:
            await pacer.turn()
            done.append(name)

        first = asyncio.create_task(request("first"))
        second = asyncio.create_task(request("second"))
        third = asyncio.create_task(request("third"))
        await asyncio.sleep(0)  # first got its turn; second and third wait
        second.cancel()
        await asyncio.gather(first, third, second, return_exceptions=True)
        return done

    assert asyncio.run(scenario()) == ["first", "third"]
