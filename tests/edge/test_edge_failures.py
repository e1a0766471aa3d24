"""The agent's failure paths against the emulator as edgeHub, with the real SDK: what the SDK
raises is told in one line naming the hub and the reason, a hung edgeHub holds a bounded number
of threads, and a start-up failure elsewhere in the module reaches the twin."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from edge_harness import GATEWAY, HUB, MODULE, EdgeSite, ModuleSite

from spyrus_hsm.config import Config
from spyrus_hsm.edge.agent import EdgeAgent, EdgeHooks
from spyrus_hsm.edge.environment import detect
from spyrus_hsm.hsm import Hsm, KeyAlgorithm

pytestmark = [pytest.mark.timeout(90)]
CLIENT_ID = f"edge1/{MODULE}"


def agent_for(site: EdgeSite, hsm: Hsm, monkeypatch: pytest.MonkeyPatch, **options: Any) -> EdgeAgent:
    for name, value in site.env.items():
        monkeypatch.setenv(name, value)
    env = detect(os.environ)
    assert env is not None
    cfg = Config()
    return EdgeAgent(env, EdgeHooks(hsm, cfg, lambda: cfg, None), **options)


def edge_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("spyrus_hsm.edge") and r.levelno >= logging.WARNING]


def test_a_refused_credential_is_told_in_one_line_naming_the_hub_and_the_reason(
        site: EdgeSite, hsm: Hsm, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    site.emu.refuse_hub(2)  # CONNACK 5: the SDK raises CredentialError
    with caplog.at_level(logging.INFO):
        agent = agent_for(site, hsm, monkeypatch, retry_max=1.0).start()
        try:
            reported = site.wait_reported(lambda r: r.get("config") and r.get("lastError"), timeout=30)
        finally:
            assert agent.stop()
    assert len(site.emu.received.refused_connects(CLIENT_ID)) == 2
    refusals = [r for r in edge_warnings(caplog) if r.getMessage().startswith("edgeHub connection")
                or "refused the credential" in r.getMessage()]
    assert len(refusals) == 2, [r.getMessage() for r in edge_warnings(caplog)]  # one line per refusal
    for record in refusals:  # before: "edgeHub connection failed (…): CredentialError: …"
        message = record.getMessage()
        assert message.startswith(f"IoT Hub {HUB} via edgeHub "), message
        assert f"({CLIENT_ID}) refused the credential while connecting: " in message, message
        assert "\n" not in message and record.exc_info is None
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("spyrus_hsm"))
    assert reported["lastError"]["source"] == "edge"
    assert "refused the credential while connecting" in reported["lastError"]["message"]


def test_a_hung_edgehub_holds_at_most_the_lanes_width_of_sdk_threads(
        site: EdgeSite, hsm: Hsm, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    agent = agent_for(site, hsm, monkeypatch, sdk_timeout=0.3, retry_max=0.3).start()
    try:
        site.wait_reported(lambda r: r.get("config"))
        with caplog.at_level(logging.INFO):
            site.emu.stall_hub(True)  # twin requests and reported patches get no answer
            try:
                agent.report_error("test", "a patch that gets no answer")
                # Each call given up on replaces the client; the new one's twin read hangs again.
                site.emu.wait_for(lambda: sum("replacing the IoT Edge client" in r.getMessage()
                                              for r in caplog.records) >= 6, 40, interval=0.1)
                threads = [t for t in threading.enumerate() if t.name == "edge-sdk-call"]
            finally:
                site.emu.stall_hub(False)
        agent.report_error("test", "once edgeHub answers again")  # the agent recovers on its own
        reported = site.wait_reported(lambda r: (r.get("lastError") or {}).get("source") == "test", timeout=40)
    finally:
        assert agent.stop()
    print(f"hung edgeHub: {len(threads)} SDK call threads after 6 client replacements")
    # A replaced client's shutdown cancels its pending requests (their threads end); the lane
    # caps those that never return. Before: the same count, but the timeouts were told as
    # "reading the module twin: no answer within 0.3 s", naming neither hub nor identity.
    assert len(threads) <= 2, threads
    timeouts = [r.getMessage() for r in edge_warnings(caplog) if "did not answer" in r.getMessage()]
    told = f"IoT Hub {HUB} via edgeHub {GATEWAY} ({CLIENT_ID}) did not answer within 0.3 s while "
    assert timeouts and all(told in m for m in timeouts), timeouts
    assert reported["lastError"]["message"] == "once edgeHub answers again"


def test_an_api_that_cannot_start_shows_in_the_twin_with_the_short_reason_and_no_path(
        site: EdgeSite, module_site: Callable[..., ModuleSite], hsm: Hsm, token_env: Any, tmp_path: Path) -> None:
    label = "api-tls-" + secrets.token_hex(3)
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)  # a key, no certificate beside it
    module_site(policy=[], tls_key_label=label, tls_cert_file=None, tls_key_file=None).start()
    reported = site.wait_reported(lambda r: (r.get("lastError") or {}).get("source") == "api", timeout=30)
    message = reported["lastError"]["message"]
    assert message.startswith("the API cannot start: "), message
    assert f"no certificate is stored beside HSM key '{label}'" in message, message
    assert str(tmp_path) not in message and str(token_env.pin_file) not in message
    assert token_env.pin.decode() not in message and "/" not in message, message
