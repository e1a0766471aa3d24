"""The leaf's back-off: jittered, capped, and never shorter than the service's Retry-After."""

from __future__ import annotations

import pytest

from spyrus_hsm.leaf import Backoff


@pytest.mark.parametrize("attempt", range(12))
def test_the_wait_is_jittered_below_the_exponential_bound_and_the_cap(attempt: int) -> None:
    backoff = Backoff(base=0.5, cap=8.0)
    waits = {backoff.delay(attempt) for _ in range(50)}
    assert all(0.0 <= w <= min(8.0, 0.5 * 2 ** attempt) for w in waits)
    assert len(waits) > 1  # jittered: leaves that failed together do not come back together


def test_retry_after_is_honoured_with_a_little_spread() -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    waits = [backoff.delay(0, retry_after=7) for _ in range(50)]
    assert all(7.0 <= w <= 7.5 for w in waits)


def test_retry_after_is_capped_too() -> None:
    assert Backoff(base=0.5, cap=4.0).delay(0, retry_after=3600) <= 4.5
