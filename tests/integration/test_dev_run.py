"""`make run` (scripts/dev-run.sh): from nothing to a serving module whose printed curl commands
work exactly as printed, and a clean stop on SIGTERM."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import addresses
from cryptography import x509
from service_harness import verify_sas

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    """A port on 127.0.0.1, where `make run` listens: one of this test session's (tests/addresses.py)."""
    return addresses.port(addresses.LOOPBACK)


def _curl(line: str) -> tuple[int, str]:
    proc = subprocess.run(["bash", "-c", line + " -s -w '\\n%{http_code}'"], capture_output=True, text=True,
                          timeout=30, check=False)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code), body


def _start(state: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    """dev-run.sh until it serves: the process and what it printed up to then."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPYRUS_", "SOFTHSM", "OTEL_"))}
    env.update(SPYRUS_DEV_STATE=str(state), SPYRUS_DEV_PORT=str(port), OTEL_SDK_DISABLED="true")
    proc = subprocess.Popen(["bash", "scripts/dev-run.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise AssertionError(f"dev-run.sh ended early ({proc.returncode}): "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        out.append(line)
        if "API on https://" in line:
            break
    return proc, "".join(out)


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_make_run_serves_and_its_curl_commands_work_as_printed(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    port = _free_port()
    proc, text = _start(state, port)
    try:
        # The API handshakes with a short-lived key that the service key in the HSM certified.
        served = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())
        assert served.issuer.rfc4514_string() == "CN=spyrus-hsm development service"
        # service.tls_lifetime (72 h) after a backdate of 24 h (identity.service_ca.BACKDATE)
        assert served.not_valid_after_utc - served.not_valid_before_utc <= dt.timedelta(hours=96, minutes=5)
        assert "independent check: signature verifies" in text
        commands = [m.strip() for m in re.findall(r"^  (curl .*)$", text, re.M)]
        assert len(commands) == 5
        results = [_curl(c) for c in commands]
        assert [code for code, _ in results] == [200, 200, 200, 403, 200]
        for _, body in results[1:3]:
            verify_sas(json.loads(body)["token"], base64.b64decode((state / "demo-device.key").read_text()))
        assert json.loads(results[3][1])["type"].endswith("/forbidden")
        audit = [json.loads(x) for x in (state / "state" / "audit.log").read_text().splitlines()]
        assert [a["outcome"] for a in audit] == ["allowed", "allowed", "denied"]
        bearer = (state / "bearer.token").read_text().strip()
        assert bearer not in text and bearer not in (state / "state" / "audit.log").read_text()
        assert bearer not in (state / "config.yaml").read_text()
    finally:
        assert _stop(proc) == 0


def test_make_run_a_second_time_reuses_the_token_and_serves_again(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    first, _ = _start(state, _free_port())
    assert _stop(first) == 0
    second, text = _start(state, _free_port())
    try:
        commands = [m.strip() for m in re.findall(r"^  (curl .*)$", text, re.M)]
        assert [_curl(c)[0] for c in commands[:2]] == [200, 200]
    finally:
        assert _stop(second) == 0


def test_make_run_serves_metrics_on_loopback_only(tmp_path: Path) -> None:
    metrics_port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPYRUS_", "SOFTHSM", "OTEL_"))}
    env.update(SPYRUS_DEV_STATE=str(tmp_path / "dev"), SPYRUS_DEV_PORT=str(_free_port()),
               SPYRUS_DEV_METRICS_PORT=str(metrics_port), OTEL_SDK_DISABLED="false")
    proc = subprocess.Popen(["bash", "scripts/dev-run.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        deadline, line = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "metrics on http://" not in line:
            line = proc.stdout.readline()
            assert line, f"dev-run.sh ended early ({proc.wait()})"
        assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in line, line
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=5):
            pass  # listening on loopback ...
        # ... and only there: a listener on 0.0.0.0 would answer on any other loopback address too
        elsewhere = addresses.host()  # nothing of this session's listens there
        with socket.socket() as s, contextlib.suppress(ConnectionRefusedError):
            s.settimeout(5)
            s.connect((elsewhere, metrics_port))
            raise AssertionError(f"the metrics listener answers on {elsewhere}: it is not bound to 127.0.0.1 alone")
    finally:
        assert _stop(proc) == 0

