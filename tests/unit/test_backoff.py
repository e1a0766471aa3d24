"""The one back-off (spyrus_hsm.backoff): capped exponential, jitter drawn from an injected source."""

from __future__ import annotations

import pytest

from spyrus_hsm.backoff import Backoff


def lowest(a: float, b: float) -> float:
    return a


def highest(a: float, b: float) -> float:
    return b


@pytest.mark.parametrize(("failures", "ceiling"), [(1, 2), (2, 4), (3, 8), (4, 16), (5, 30), (12, 30), (500, 30)])
def test_the_wait_doubles_from_initial_up_to_the_cap(failures: int, ceiling: float) -> None:
    assert Backoff(initial=2, cap=30).delay(failures) == ceiling


@pytest.mark.parametrize("failures", [1, 3, 9])
def test_full_jitter_draws_between_zero_and_the_exponential(failures: int) -> None:
    draws: list[tuple[float, float]] = []

    def record(a: float, b: float) -> float:
        draws.append((a, b))
        return (a + b) / 2

    wait = Backoff(initial=0.5, cap=8.0, jitter="full", uniform=record).delay(failures)
    bound = min(8.0, 0.5 * 2 ** (failures - 1))
    assert draws == [(0.0, bound)]
    assert wait == bound / 2


def test_upper_half_jitter_draws_between_half_and_the_whole_exponential() -> None:
    assert Backoff(initial=2, cap=30, jitter="upper-half", uniform=lowest).delay(3) == 4
    assert Backoff(initial=2, cap=30, jitter="upper-half", uniform=highest).delay(3) == 8


def test_a_retry_after_longer_than_the_back_off_is_waited_out() -> None:
    for jitter in ("none", "upper-half"):
        assert Backoff(initial=2, cap=30, jitter=jitter, uniform=highest).delay(1, retry_after=45) == 45


def test_a_retry_after_shorter_than_the_back_off_does_not_shorten_it() -> None:
    assert Backoff(initial=2, cap=30, jitter="upper-half", uniform=highest).delay(4, retry_after=3) == 16


def test_under_full_jitter_a_retry_after_is_spread_over_one_initial_past_it() -> None:
    backoff = Backoff(initial=0.5, cap=30.0, jitter="full", uniform=lowest)
    assert backoff.delay(1, retry_after=7) == 7
    backoff.uniform = highest
    assert backoff.delay(1, retry_after=7) == 7.5


def test_a_retry_after_is_honoured_only_up_to_its_cap_when_one_is_set() -> None:
    assert Backoff(initial=0.5, cap=4.0, jitter="full", retry_after_cap=4.0, uniform=highest).delay(
        1, retry_after=3600) == 4.5
    assert Backoff(initial=1, cap=4.0).delay(1, retry_after=3600) == 3600


def test_a_negative_retry_after_counts_as_none() -> None:
    assert Backoff(initial=2, cap=30).delay(2, retry_after=-5) == 4


def test_next_counts_failures_and_reset_starts_again_from_initial() -> None:
    backoff = Backoff(initial=1, cap=5)
    assert [backoff.next() for _ in range(5)] == [1, 2, 4, 5, 5]
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.next() == 1


def test_the_default_source_jitters() -> None:
    backoff = Backoff(initial=1, cap=64, jitter="full")
    assert len({backoff.delay(7) for _ in range(20)}) > 1
