"""HubClient's deadlines on the SDK's connect, with SDK clients that answer when the test says
(`_build` is the one place HubClient makes an SDK client): a connect that misses its deadline
and succeeds later is shut down, never left connected beside the client in use."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
from waiting import wait_for

from spyrus_hsm.cloud.hub import HubClient, HubIdentity
from spyrus_hsm.sdkerrors import HubTimeout


class SlowClient:
    """An SDK client whose connect returns once `go` is set."""

    def __init__(self, go: threading.Event) -> None:
        self.go = go
        self.connected = False
        self.shut = threading.Event()

    def connect(self) -> None:
        self.go.wait()
        self.connected = True

    def shutdown(self) -> None:
        self.connected = False
        self.shut.set()


class Clients(HubClient):
    def __init__(self, identity: HubIdentity, **options: Any) -> None:
        super().__init__(None, identity, **options)  # type: ignore[arg-type]  (no SAS, no HSM call)
        self.made: list[tuple[str, SlowClient]] = []
        self.answers: dict[str, threading.Event] = {}

    def _build(self, identity: HubIdentity) -> SlowClient:
        client = SlowClient(self.answers.setdefault(identity.device_id, threading.Event()))
        self.made.append((identity.device_id, client))
        return client


def test_a_move_whose_connect_misses_its_deadline_goes_back_and_shuts_the_late_client_down(tmp_path: Any) -> None:
    from spyrus_hsm.identity.x509 import TlsFiles

    old = HubIdentity("hub.example", "old", x509=TlsFiles(tmp_path / "old.pem", tmp_path / "old.key"))
    hub = Clients(old, connect_timeout=0.2, watch_interval=60)
    hub.answers["old"] = threading.Event()
    hub.answers["old"].set()
    hub.connect()
    try:
        with pytest.raises(HubTimeout, match=r"hub\.example .*did not answer within 0\.2 s while connecting"):
            hub.switch(replace(old, device_id="new"))
        assert hub.identity.device_id == "old" and hub.connected  # back on the previous credential
        late = next(c for name, c in hub.made if name == "new")
        hub.answers["new"].set()  # the hub answers the abandoned connect after all
        assert late.shut.wait(10), "the client that connected late was left connected"
        wait_for(lambda: not late.connected, 10, "the late client shut down", every=0.01)
        assert hub.client is not late and hub.client.connected
    finally:
        hub.shutdown()
