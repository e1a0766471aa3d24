"""`serve` stopped while a leaf's DPS registration hangs (a DPS address that takes the connection
and never answers): it exits 0 within edgeAgent's 10 s, says what it abandoned, and no thread of
the module is left but the hung call's. Before the one thread model the registration ran on a
private executor whose threads were not daemons: the interpreter waited for it at exit, up to
`registration_timeout` (60 s), and edgeAgent killed the module at 10 s."""

from __future__ import annotations

import http.client
import json
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import addresses
import pytest
from service_harness import HOST, serve_config
from test_collector_down import api_port_from

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret

pytestmark = pytest.mark.timeout(120)

EDGE_AGENT_GRACE = 10.0
DPS_PORT = 8883  # the SDK's MQTT port for DPS


class BlackHole:
    """A TCP listener that takes connections and never sends a byte."""

    def __init__(self) -> None:
        self.host = addresses.host()
        self.sock = socket.create_server((self.host, DPS_PORT))
        self.held: list[socket.socket] = []
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.connected.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def _register(port: int, ctx: ssl.SSLContext, bearer: str, reg: str, answers: list[Any]) -> None:
    conn = http.client.HTTPSConnection(HOST, port, context=ctx, timeout=90)
    try:
        conn.request("POST", "/v1/registrations", body=json.dumps(
            {"registrationId": reg, "idScope": "0ne00FA4E", "attestation": "symmetricKey"}),
            headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"})
        answers.append(conn.getresponse().status)
    except (OSError, http.client.HTTPException) as exc:
        answers.append(type(exc).__name__)  # cut off by the stop
    finally:
        conn.close()


def test_serve_stops_in_time_while_a_registration_hangs_and_leaves_no_thread_of_its_own(
        hsm: Hsm, token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    reg = f"leaf-{secrets.token_hex(3)}"
    hsm.import_secret_key(reg, Secret(secrets.token_bytes(32)))
    bearer = secrets.token_urlsafe(24)
    dps = BlackHole()
    config = serve_config(tmp_path, token_env, emulator_pki, {
        "bearer": {"gateway": bearer}, "registration_timeout": 60, "request_timeout": 120,
        "rate_limit_per_second": 0,
        "policy": [{"principals": ["gateway"], "operations": ["registration"], "devices": ["leaf-*"]}]})
    document = json.loads(config.read_text())
    document["cloud"] = {"provisioning_host": dps.host, "server_ca_file": str(emulator_pki.ca_file)}
    document["metrics"] = {"enabled": False}
    config.write_text(json.dumps(document))
    ctx = ssl.create_default_context(cafile=str(emulator_pki.ca_file))
    err_file = tmp_path / "serve.err"
    answers: list[Any] = []
    asker: threading.Thread | None = None
    with err_file.open("wb") as err:
        env = token_env.env(SPYRUS_HSM_CONFIG=str(config), OTEL_SDK_DISABLED="true")
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "-v", "serve"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        try:
            port = api_port_from(proc, within=30)
            asker = threading.Thread(target=_register, args=(port, ctx, bearer, reg, answers))
            asker.start()
            # The registration is in flight once the request is in (its lane call runs up to
            # registration_timeout); it usually reaches the silent DPS within a second.
            reached = dps.connected.wait(20)
            in_flight = not answers  # no answer yet: the registration still runs (it may not have
            # reached DPS under a loaded machine's first SDK import; it is in flight all the same)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            try:
                code = proc.wait(timeout=EDGE_AGENT_GRACE + 60)
            finally:
                stopped_in = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
            if asker is not None:
                asker.join(30)
            dps.close()
    log = err_file.read_text()
    print(f"\nserve stopped {stopped_in:.2f} s after SIGTERM (exit code {code}); DPS reached: {reached}; "
          f"answers before the stop: {answers if not in_flight else 'none'}")
    assert code == 0, log[-3000:]
    assert stopped_in < EDGE_AGENT_GRACE, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    if in_flight:  # what the stop cut off is named (a registration that already failed is not)
        assert re.search(rf"abandoned at exit: .*dps: registering '{reg}' with DPS", log), (answers, log[-3000:])
    alive = re.search(r"stopped; threads alive: (.*)", log)
    assert alive is not None, log[-3000:]
    # Of the module's own threads only the hung call's (a daemon) is left; the SDK's threads under
    # it are the SDK's.
    names = set(alive.group(1).split(", "))
    module_threads = {"hsm-supervisor", "api-tls", "audit-writer", "cloud-connect", "edge-agent", "stop",
                      "module-hsm", "metrics-render", "service-files", "api-stop", "telemetry-stop"}
    assert "MainThread" in names and not (names & module_threads), names
    assert not [n for n in names if n.startswith("hsm-worker")], names
