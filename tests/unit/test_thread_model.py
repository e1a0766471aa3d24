"""The thread model (threads.py): lanes for blocking calls, workers for long-lived loops, and
nothing else in the package starts a thread."""

from __future__ import annotations

import asyncio
import contextvars
import re
import threading
from pathlib import Path

import pytest

from spyrus_hsm import threads
from spyrus_hsm.threads import Lane, LaneClosed

PACKAGE = Path(threads.__file__).parent
FORBIDDEN = re.compile(r"threading\.Thread\(|ThreadPoolExecutor\(|ProcessPoolExecutor\(|to_thread\(|"
                       r"run_in_executor\(|_thread\.start_new")


def test_nothing_outside_threads_py_starts_a_thread() -> None:
    found = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "threads.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if FORBIDDEN.search(line) and not line.lstrip().startswith("#")]
    assert found == [], "start threads through threads.Lane or threads.Worker (docs/development/threads.md)"


class Gate:
    """A blocking call that returns when the test opens the gate."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()

    def __call__(self) -> str:
        self.entered.set()
        self.opened.wait(10)
        return "through"


def test_a_lane_runs_calls_from_the_loop_in_the_callers_context() -> None:
    lane = Lane("t-context", 2)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def main() -> tuple[str, str]:
        var.set("the caller's")
        on_thread = await lane.run(lambda: (var.get(), threading.current_thread().name), 5, "reading")
        return on_thread

    value, name = asyncio.run(main())
    assert (value, name) == ("the caller's", "t-context")
    assert lane.busy == 0


def test_a_call_that_outlives_its_deadline_keeps_its_place_and_the_next_waits_for_one() -> None:
    lane = Lane("t-width", 1)
    gate = Gate()

    async def main() -> None:
        with pytest.raises(TimeoutError, match=r"hung: no answer within 0\.2 s"):
            await lane.run(gate, 0.2, "hung")
        assert lane.running() == ["hung"]
        with pytest.raises(TimeoutError, match="1 earlier call"):  # no second thread for it
            await lane.run(lambda: "never", 0.2, "second")
        waiting = asyncio.ensure_future(lane.run(lambda: "third", 5, "third"))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        gate.opened.set()  # the hung call returns: its place goes to the waiting caller
        assert await waiting == "third"

    asyncio.run(main())
    assert sum(t.name == "t-width" for t in threading.enumerate()) <= 1


def test_an_exception_reaches_the_caller_and_frees_the_place() -> None:
    lane = Lane("t-error", 1)

    def fail() -> None:
        raise ValueError("the token said no")

    with pytest.raises(ValueError, match="the token said no"):
        lane.call(fail, 5, "failing")
    assert lane.call(lambda: 42, 5, "next") == 42


def test_a_closed_lane_takes_no_call_and_says_what_still_runs() -> None:
    lane = Lane("t-close", 2)
    gate = Gate()
    lane.submit(gate, 5, "a DPS registration")
    assert gate.entered.wait(5)
    assert lane.close(0.1) == ["a DPS registration"]
    with pytest.raises(LaneClosed):
        lane.call(lambda: None, 5, "after the stop")
    gate.opened.set()
    assert lane.close(5) == []


def test_the_outcome_of_a_call_whose_caller_was_cancelled_is_not_reported_as_never_retrieved(
        caplog: pytest.LogCaptureFixture) -> None:
    """The stop cancels the loop's tasks while their calls still run; a call that then fails
    must not make asyncio log "Future exception was never retrieved" with its traceback."""
    import gc

    lane = Lane("t-cancelled", 1)
    gate = Gate()

    def fail() -> None:
        gate()
        raise RuntimeError("the HSM is not ready")

    async def main() -> None:
        task = asyncio.ensure_future(lane.run(fail, 5, "reading"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.opened.set()
        await asyncio.sleep(0.2)  # the call fails after its caller went away
        gc.collect()  # the outcome's future goes: asyncio reports an exception nobody took then

    asyncio.run(main())
    assert "never retrieved" not in caplog.text
