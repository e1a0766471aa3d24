"""`spyrus-hsm serve`'s listeners as an operator meets them: a port that is taken stops the
module with one line naming the address and the setting (exit 2), for the API and the health
port alike; and /readyz is true only once the HTTPS API accepts connections, also when its TLS
key is in the HSM (the API then starts only after the HSM is ready)."""

from __future__ import annotations

import http.client
import secrets
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from service_harness import HOST, free_port, serve_config, store_hsm_certificate

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm

pytestmark = pytest.mark.timeout(120)


def serve(config: Path, token_env: Any, err: Any) -> subprocess.Popen[bytes]:
    env = token_env.env(SPYRUS_HSM_CONFIG=str(config), OTEL_SDK_DISABLED="true")
    return subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "serve"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)


@pytest.mark.parametrize("setting", ["port", "health_port"])
def test_a_port_in_use_stops_serve_with_one_line_naming_it(setting: str, token_env: Any, tmp_path: Path,
                                                          emulator_pki: EmulatorPki) -> None:
    with socket.create_server((HOST, 0)) as occupant:
        taken = occupant.getsockname()[1]
        config = serve_config(tmp_path, token_env, emulator_pki, {"port": 0, "health_port": 0, setting: taken})
        err_file = tmp_path / "serve.err"
        with err_file.open("wb") as err:
            proc = serve(config, token_env, err)
            try:
                code = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    log = err_file.read_text()
    assert code == 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if f"{HOST}:{taken}" in line]
    assert len(lines) == 1 and f"service.{setting}" in lines[0], log[-3000:]
    assert [line for line in log.splitlines() if line.startswith("ERROR")] == lines, log[-3000:]


def test_readyz_is_true_only_once_the_api_accepts_tls_connections(hsm: Hsm, token_env: Any, tmp_path: Path,
                                                                 emulator_pki: EmulatorPki) -> None:
    label = "api-tls-" + secrets.token_hex(3)
    store_hsm_certificate(hsm, label, emulator_pki, server_ip=HOST)
    api_port, health_port = free_port(), free_port()
    config = serve_config(tmp_path, token_env, emulator_pki, {
        "port": api_port, "health_port": health_port, "tls_key_label": label,
        "tls_cert_file": None, "tls_key_file": None})
    ctx = ssl.create_default_context(cafile=str(emulator_pki.ca_file))
    err_file = tmp_path / "serve.err"
    polls = 0
    with err_file.open("wb") as err:
        proc = serve(config, token_env, err)
        try:
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, "/readyz was not true within 60 s"
                assert proc.poll() is None, err_file.read_text()[-3000:]
                polls += 1
                if readyz(health_port) == 200:
                    break
                time.sleep(0.01)
            # Immediately: a leaf that saw the module ready is served.
            api = http.client.HTTPSConnection(HOST, api_port, context=ctx, timeout=10)
            api.request("GET", "/healthz")
            status = api.getresponse().status
            api.close()
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
    assert status == 200
    assert polls > 1  # /readyz was polled while the module started, not only after


def readyz(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        conn.request("GET", "/readyz")
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:  # not listening yet
        return None
