"""Closing old IoT Hub clients (cloud/hub.py): an SDK shutdown that hangs once must not leave
every later client unclosed, and the one that hung is tried again. An old client left connected
reconnects under the same device id and pushes the new connection off."""

from __future__ import annotations

import threading

from fakes import FakeKeyStore, Faults
from waiting import wait_for

from spyrus_hsm.cloud.hub import HubClient, HubIdentity


class SdkClient:
    """What HubClient asks of an SDK client when closing it: `shutdown()`, which hangs while
    `hang` is set (the first `hangs` times it is called)."""

    def __init__(self, hangs: int = 0) -> None:
        self.hangs = hangs
        self.release = threading.Event()
        self.calls = 0
        self.closed = False

    def shutdown(self) -> None:
        self.calls += 1
        if self.calls <= self.hangs:
            self.release.wait(30)
            return
        self.closed = True


class Connected:
    connected = True

    def shutdown(self) -> None:
        pass


def _hub() -> HubClient:
    return HubClient(FakeKeyStore(Faults()), HubIdentity("hub.example", "edge-1", sas_key="k"),  # type: ignore[arg-type]
                     call_timeout=0.2, watch_interval=0.05)


def test_a_shutdown_that_hangs_once_neither_blocks_later_closes_nor_stays_unclosed() -> None:
    hub = _hub()
    hung, later = SdkClient(hangs=1), SdkClient()
    try:
        assert hub._close(hung) is False  # its shutdown did not return in time
        assert hub._close(later) is True  # before: no place in a one-wide lane, given up, left connected
        assert later.closed
        hub._close_unclosed()  # what the watchdog does on its next pass (without waiting for it)
        wait_for(lambda: hung.closed, 10, "the old client closed by the retry")
        assert hung.closed and hung.calls == 2
    finally:
        hung.release.set()
        hub.shutdown()


def test_the_watchdog_tries_again_until_the_old_client_is_closed() -> None:
    hub = _hub()
    stubborn = SdkClient(hangs=2)
    hub._client = Connected()  # connected, as far as the watchdog is concerned: no rebuild
    hub._worker.spawn(hub._watchdog, "hub-watchdog")
    try:
        hub._close(stubborn)
        wait_for(lambda: stubborn.closed, 10, "the old client closed by the watchdog")
        assert stubborn.calls == 3
    finally:
        stubborn.release.set()
        hub._client = None
        hub.shutdown()
