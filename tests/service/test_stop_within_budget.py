"""`spyrus-hsm serve` stops within edgeAgent's 10 s even when several of its parts hang on the
way out: a signature stuck in the token (the shim's sign delay), an audit disk that takes no
write (a stalled FIFO) and an OpenTelemetry collector that never answers. Each would wait its own
few seconds; together they shared no budget and added up past 10 s. The stop now shares one
deadline, and says which parts it gave up on.

These run in the pytest process whose PKCS#11 module is the shim (marker `shim`).
"""

from __future__ import annotations

import http.client
import json
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from otlp_receiver import SilentCollector
from service_harness import HOST, free_port, serve_config
from test_audit_stall import StalledPipe
from test_collector_down import api_port_from
from waiting import wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret

pytestmark = [pytest.mark.shim, pytest.mark.timeout(120)]

EDGE_AGENT_GRACE = 10.0  # seconds edgeAgent waits after SIGTERM before it kills the module
POLICY = [{"principals": ["gateway"], "operations": ["sas-token"], "devices": ["allowed-*"]}]


def queue_depth(port: int) -> float:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("spyrus_hsm_hsm_queue_depth"))


def ask(port: int, ctx: ssl.SSLContext, bearer: str, device: str, answers: list[Any]) -> None:
    conn = http.client.HTTPSConnection(HOST, port, context=ctx, timeout=60)
    try:
        conn.request("POST", "/v1/sas-tokens", body=json.dumps({"deviceId": device}),
                     headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"})
        answers.append(conn.getresponse().status)
    except (OSError, http.client.HTTPException) as exc:
        answers.append(type(exc).__name__)  # cut off by the stop: expected
    finally:
        conn.close()


def test_serve_stops_within_edge_agents_grace_when_the_token_the_audit_disk_and_the_collector_hang(
        hsm: Hsm, token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    device = f"allowed-{secrets.token_hex(3)}"
    hsm.import_secret_key(device, Secret(secrets.token_bytes(32)))
    bearer = secrets.token_urlsafe(24)
    stalled = StalledPipe(tmp_path / "audit.fifo")
    config = serve_config(tmp_path, token_env, emulator_pki, {
        "bearer": {"gateway": bearer}, "policy": POLICY, "cache_reuse_fraction": 0, "rate_limit_per_second": 0,
        "audit_file": str(stalled.path)})
    metrics_port = free_port()
    document = json.loads(config.read_text())
    document["metrics"] = {"host": HOST, "port": metrics_port}
    config.write_text(json.dumps(document))
    ctx = ssl.create_default_context(cafile=str(emulator_pki.ca_file))
    err_file = tmp_path / "serve.err"
    answers: list[Any] = []
    with SilentCollector() as collector, err_file.open("wb") as err:
        env = token_env.env(SPYRUS_HSM_CONFIG=str(config), OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
                            OTEL_METRIC_EXPORT_INTERVAL="200")
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "-v", "serve"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        asker = threading.Thread(target=ask, args=(0, ctx, bearer, device, answers))
        try:
            port = api_port_from(proc, within=30)
            # A refusal's record: the audit writer takes it and blocks on the stalled FIFO.
            ask(port, ctx, bearer, "refused-device", answers)
            assert answers == [403]
            token_env.set_shim(sign_delay_ms=60000)
            asker = threading.Thread(target=ask, args=(port, ctx, bearer, device, answers))
            asker.start()
            wait_for(lambda: queue_depth(metrics_port) >= 1, 20, "the signature at the token", every=0.05)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            try:
                code = proc.wait(timeout=EDGE_AGENT_GRACE + 10)
            finally:
                stopped_in = time.monotonic() - started
        finally:
            token_env.set_shim(state="plugged")
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
            if asker.ident is not None:
                asker.join(30)
            stalled.close()
    log = err_file.read_text()
    print(f"\nserve stopped {stopped_in:.2f} s after SIGTERM (exit code {code})")
    assert code == 0, log[-3000:]
    assert stopped_in < EDGE_AGENT_GRACE, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
