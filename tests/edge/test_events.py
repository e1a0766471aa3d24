"""Upstream events on the module output `events`, received by the emulator acting as edgeHub,
each with the application property `type` that edgeHub's routes filter on.

`serve` runs in its own process (a wrong PIN is refused only at a process's first login): it
starts with a wrong PIN, is fixed, finds a certificate close to expiry, has a twin patch
rejected and refuses some requests. The bounded buffer and `events.certificate_renewed` are
tested in this process with the SDK's own module client connected to the emulator; an unplugged
HSM (the shim) with the module running in this process.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.iot.device import IoTHubModuleClient
from edge_harness import MODULE, EdgeSite, ModuleSite
from service_harness import ask_sas_token, serve_config, stop_process, store_hsm_certificate, wait_for_lines

from emulator.pki import EmulatorPki
from spyrus_hsm import events
from spyrus_hsm.config import EventsConfig
from spyrus_hsm.hsm import Hsm, Secret

pytestmark = pytest.mark.timeout(120)

Event = tuple[dict[str, Any], dict[str, Any]]  # (message properties, body)


def received(site: EdgeSite) -> list[Event]:
    return [(r.properties, r.json()) for r in list(site.emu.received.telemetry)
            if r.module_id == MODULE and r.properties.get("$.on") == "events"]


def wait_event(site: EdgeSite, type_: str, match: Callable[[dict[str, Any]], bool] = lambda body: True,
               timeout: float = 40.0) -> Event:
    def find() -> Event | None:
        return next(((p, b) for p, b in received(site) if p.get("type") == type_ and match(b)), None)

    return site.emu.wait_for(find, timeout, interval=0.1)


@pytest.fixture
def serve(token_env: Any, tmp_path: Path, site: EdgeSite, emulator_pki: EmulatorPki,  # type: ignore[no-untyped-def]
          ) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], int]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(pin_file: Path, bearer: str) -> tuple[subprocess.Popen[bytes], int]:
        config = serve_config(tmp_path, token_env, emulator_pki, {
            "bearer": {"gw": bearer}, "rate_limit_per_second": 0,
            "policy": [{"principals": ["gw"], "operations": ["sas-token"], "devices": ["ev-*"]}]})
        document = json.loads(config.read_text())
        document["hsm"]["pin_file"] = str(pin_file)
        document["hsm"]["call_timeout"] = 5
        document["metrics"] = {"enabled": False}
        document["events"] = {"summary_interval": 1}
        config.write_text(json.dumps(document))
        env = token_env.env(SPYRUS_HSM_CONFIG=str(config), **site.env)
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "-v", "serve"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        started.append(proc)
        port = int(wait_for_lines(proc, ("API on https://",), within=60)["API on https://"].rsplit(":", 1)[1])
        return proc, port

    yield start
    for proc in started:
        stop_process(proc)


def test_significant_events_arrive_on_the_events_output_with_a_routable_type(
        site: EdgeSite, serve: Any, token_env: Any, hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    cert_label = f"ev-cert-{secrets.token_hex(3)}"
    store_hsm_certificate(hsm, cert_label, emulator_pki)  # valid for one day: within the 14-day warning
    device = f"ev-{secrets.token_hex(3)}"
    hsm.import_secret_key(device, Secret(secrets.token_bytes(32)))
    pin_file = tmp_path / "pin"
    pin_file.write_text("wrong-pin-000\n")
    pin_file.chmod(0o600)
    bearer = secrets.token_urlsafe(24)
    _, port = serve(pin_file, bearer)

    props, body = wait_event(site, "hsm.pinRefused")
    assert props["$.ct"] == "application/json" and "PIN" in body["reason"]
    assert body["deviceId"] == "edge1" and body["moduleId"] == MODULE

    pin_file.write_text(token_env.pin.decode() + "\n")
    wait_event(site, "hsm.recovered")
    _, body = wait_event(site, "certificate.expiring", lambda b: b["label"] == cert_label)
    assert 0 < body["daysLeft"] <= 1

    version = site.patch({"service": {"rateLimitBurst": 0}})
    site.wait_config(version)
    _, body = wait_event(site, "config.rejected")
    assert body["source"] == "twin" and "rateLimitBurst" in body["error"]

    ctx = ssl.create_default_context(cafile=str(emulator_pki.ca_file))
    assert [ask_sas_token(port, ctx, "wrong-" + bearer, device) for _ in range(2)] == [401, 401]
    assert ask_sas_token(port, ctx, bearer, "not-allowed") == 403
    assert ask_sas_token(port, ctx, bearer, device) == 200

    def refused() -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = {}
        for p, b in received(site):
            if p.get("type") == "requests.refused":
                for name, counts in b["principals"].items():
                    for reason, n in counts.items():
                        totals.setdefault(name, {"denied": 0, "rateLimited": 0})[reason] += n
        return totals

    expected = {"(unauthenticated)": {"denied": 2, "rateLimited": 0}, "gw": {"denied": 1, "rateLimited": 0}}
    try:
        site.emu.wait_for(lambda: refused() == expected, 20, interval=0.1)
    except TimeoutError:
        raise AssertionError(refused()) from None
    everything = json.dumps(received(site))
    assert bearer not in everything and token_env.pin.decode() not in everything


@pytest.fixture
def sdk_client(site: EdgeSite) -> Iterator[Any]:
    conn = site.env["EdgeHubConnectionString"]
    ca = Path(site.env["EdgeModuleCACertificateFile"]).read_text()
    client = IoTHubModuleClient.create_from_connection_string(conn, server_verification_cert=ca)
    client.connect()
    yield client
    client.shutdown()


def test_events_wait_in_a_bounded_buffer_while_edgehub_is_away_and_others_can_announce_renewals(
        site: EdgeSite, sdk_client: Any) -> None:
    connected = threading.Event()
    sender = events.Events(EventsConfig(buffer=3), "edge1", MODULE)
    sender.start(lambda: sdk_client if connected.is_set() else None)
    events.install(sender)
    try:
        later = dt.datetime(2031, 1, 2, tzinfo=dt.UTC)
        for i in range(4):
            events.config_rejected("file", f"problem {i}")
        events.certificate_renewed("edge-id", later, dt.datetime(2030, 1, 2, tzinfo=dt.UTC))
        assert sender.pending() == 3  # the two oldest were dropped
        assert received(site) == []
        connected.set()
        site.emu.wait_for(lambda: len(received(site)) == 3, 20, interval=0.1)
    finally:
        events.install(None)
        sender.stop()
    got = received(site)
    assert [p["type"] for p, _ in got] == ["config.rejected", "config.rejected", "certificate.renewed"]
    assert [b.get("error") for _, b in got[:2]] == ["problem 2", "problem 3"]
    assert got[0][1]["droppedBefore"] == 2 and "droppedBefore" not in got[1][1]
    assert got[2][1] == {**got[2][1], "label": "edge-id", "notAfter": "2031-01-02T00:00:00Z",
                         "previousNotAfter": "2030-01-02T00:00:00Z"}


def _refused_then_recovered(site: EdgeSite, sdk_client: Any, sender: events.Events) -> Event:
    """`sender` started on a client every send fails on, until what it holds is given up; then
    on a working client, an `hsm.recovered` event: the one event edgeHub receives."""
    conn = site.env["EdgeHubConnectionString"]
    ca = Path(site.env["EdgeModuleCACertificateFile"]).read_text()
    closed = IoTHubModuleClient.create_from_connection_string(conn, server_verification_cert=ca)
    closed.shutdown()  # every send on it fails at once
    current = [closed]
    sender.start(lambda: current[0])
    try:
        site.emu.wait_for(lambda: sender.pending() == 0, 30, interval=0.1)
        current[0] = sdk_client
        sender.emit("hsm.recovered")
        site.emu.wait_for(lambda: received(site), 20, interval=0.1)
    finally:
        sender.stop()
    [event] = received(site)
    return event


def test_an_event_edgehub_keeps_refusing_is_dropped_and_counted_rather_than_blocking_the_rest(
        site: EdgeSite, sdk_client: Any) -> None:
    sender = events.Events(EventsConfig(), "edge1", MODULE)
    sender.emit("config.rejected", source="file", error="refused for ever")
    props, body = _refused_then_recovered(site, sdk_client, sender)
    assert props["type"] == "hsm.recovered" and body["droppedBefore"] == 1


def test_a_hung_edgehub_holds_at_most_two_sender_threads_and_no_event_arrives_twice(
        site: EdgeSite, sdk_client: Any) -> None:
    sender = events.Events(EventsConfig(), "edge1", MODULE, send_timeout=0.2)
    site.emu.stall_hub(True)  # sends get no PUBACK: the SDK waits for ever
    sender.start(lambda: sdk_client)
    try:
        for i in range(3):
            sender.emit("config.rejected", source="file", error=f"unanswered {i}")
        # Each event is waited for five deadlines, then given up; before: sent again each time.
        site.emu.wait_for(lambda: sender.pending() <= 1, 30, interval=0.1)
        threads = [t for t in threading.enumerate() if t.name == "edge-events-send"]
        site.emu.stall_hub(False)
        site.emu.drop_connection(f"edge1/{MODULE}")  # on reconnecting the SDK publishes again what got no answer
        site.emu.wait_for(lambda: sender.pending() == 0 and len(received(site)) >= 1, 30, interval=0.1)
    finally:
        site.emu.stall_hub(False)
        sender.stop()
    ids = [body["eventId"] for _, body in received(site)]
    print(f"hung edgeHub: {len(threads)} sender threads; {len(ids)} of 3 events delivered, {len(set(ids))} distinct")
    assert len(threads) <= 2, threads  # before: one per attempt, ten for the first two events
    assert len(ids) == len(set(ids)), ids


@pytest.mark.shim
def test_an_unplugged_hsm_is_announced_and_so_is_its_recovery(
        site: EdgeSite, module_site: Callable[..., ModuleSite], token_env: Any) -> None:
    token_env.set_shim(state="plugged")
    module_site(policy=[]).start()
    site.wait_reported(lambda r: (r.get("hsm") or {}).get("ready") and r.get("config"))
    try:
        token_env.set_shim(state="unplugged")
        status, _ = site.method("listCredentials")  # the HSM call that meets the fault
        assert status == 503
        _, body = wait_event(site, "hsm.unavailable")
        assert body["reason"] and body["moduleId"] == MODULE
    finally:
        token_env.set_shim(state="plugged")
    _, body = wait_event(site, "hsm.recovered")
    assert body["recoveries"] == 1
    assert [p["type"] for p, _ in received(site)] == ["hsm.unavailable", "hsm.recovered"]


def test_an_event_given_up_counts_as_lost_with_the_losses_it_carried(site: EdgeSite, sdk_client: Any) -> None:
    """Buffer 1: three events pushed out, the fourth refused until given up. The next event
    delivered says four were lost before it (before: 1, the given-up event's three subtracted)."""
    sender = events.Events(EventsConfig(buffer=1), "edge1", MODULE)
    for i in range(4):  # before the sender starts: the buffer keeps the last, three are lost
        sender.emit("config.rejected", source="file", error=f"lost {i}")
    props, body = _refused_then_recovered(site, sdk_client, sender)
    assert props["type"] == "hsm.recovered" and body["droppedBefore"] == 4
