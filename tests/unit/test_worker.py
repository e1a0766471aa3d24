"""threads.Worker: one way to stop a background thread; close() is idempotent and bounded."""

from __future__ import annotations

import threading
import time

from spyrus_hsm.threads import Worker


class Waiting(Worker):
    """Runs until stopped, like the package's loops."""

    def __init__(self) -> None:
        super().__init__("test-waiting")
        self.woken = 0

    def run(self) -> None:
        while not self.stop_event.wait(60):
            pass

    def _wake_for_close(self) -> None:
        self.woken += 1


class Stuck(Worker):
    """Ignores the stop signal until released (a call that does not return)."""

    def __init__(self) -> None:
        super().__init__("test-stuck")
        self.release = threading.Event()

    def run(self) -> None:
        self.release.wait(60)


def test_close_before_start_returns_at_once_and_reports_nothing_running() -> None:
    worker = Waiting()
    assert worker.close(timeout=5) is True
    assert worker.stopping


def test_close_stops_the_thread_and_reports_that_it_ended() -> None:
    worker = Waiting()
    worker.start()
    assert worker.close(timeout=30) is True
    assert not any(t.name == "test-waiting" and t.is_alive() for t in threading.enumerate())


def test_close_twice_is_safe_and_wakes_the_thread_once() -> None:
    worker = Waiting()
    worker.start()
    assert worker.close(timeout=30) is True
    assert worker.close(timeout=30) is True
    assert worker.woken == 1


def test_close_gives_up_at_its_timeout_and_says_the_thread_is_still_running() -> None:
    worker = Stuck()
    worker.start()
    began = time.monotonic()
    assert worker.close(timeout=0.2) is False
    assert time.monotonic() - began < 30  # bounded: returned long before the thread would end
    worker.release.set()
    assert worker.close(timeout=30) is True


def test_the_timeout_covers_all_threads_together() -> None:
    worker = Stuck()
    for i in range(3):
        worker.spawn(worker.run, f"test-stuck-{i}")
    began = time.monotonic()
    assert worker.close(timeout=2.0) is False
    assert time.monotonic() - began < 2.0 * 3  # one budget for all, not 2 s per thread
    worker.release.set()
    assert worker.close(timeout=30) is True


def test_a_worker_closed_from_its_own_thread_does_not_wait_for_itself() -> None:
    results: list[bool] = []

    class SelfClosing(Worker):
        def run(self) -> None:
            results.append(self.close(timeout=30))

    worker = SelfClosing("test-self-closing")
    worker.start()
    assert worker.close(timeout=30) is True
    assert results == [True]


def test_a_worker_runs_a_target_and_calls_on_close_once() -> None:
    stop_calls: list[int] = []
    worker: Worker

    def loop() -> None:
        worker.stop_event.wait(60)

    worker = Worker("test-target", loop, on_close=lambda: stop_calls.append(1))
    worker.start()
    assert worker.close(timeout=30) is True
    assert worker.close(timeout=30) is True
    assert stop_calls == [1]
