"""`spyrus-hsm serve`'s listeners as an operator meets them: a port that is taken is reported in
one line naming the address and the setting, for the API and the health port alike, and served
once it is freed (the module stays up, not ready, rather than crash-loop); and /readyz is true
only once the HTTPS API accepts connections, also when its TLS key is in the HSM (the API then
starts only after the HSM is ready)."""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import waiting
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from service_harness import HOST, free_port, serve_config, store_hsm_certificate

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, KeyAlgorithm

pytestmark = pytest.mark.timeout(120)


def serve(config: Path, token_env: Any, err: Any) -> subprocess.Popen[bytes]:
    env = token_env.env(SPYRUS_HSM_CONFIG=str(config), OTEL_SDK_DISABLED="true")
    return subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "serve"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)


@pytest.mark.parametrize("setting", ["port", "health_port"])
def test_a_taken_port_is_reported_once_and_served_once_freed(setting: str, token_env: Any, tmp_path: Path,
                                                             emulator_pki: EmulatorPki) -> None:
    ports = {"port": free_port(), "health_port": free_port()}
    occupant = socket.create_server((HOST, ports[setting]))
    config = serve_config(tmp_path, token_env, emulator_pki, ports)
    err_file = tmp_path / "serve.err"
    with err_file.open("wb") as err:
        proc = serve(config, token_env, err)
        try:
            wait_for(lambda: f"{HOST}:{ports[setting]}" in err_file.read_text(), proc, err_file)
            if setting == "port":  # the module is up and, once its HSM is ready, says why it is not
                answers_seen: list[tuple[int, Any]] = []

                def names_the_port() -> bool:
                    if readyz(ports["health_port"]) is None:
                        return False
                    answers_seen.append(readyz_answer(ports["health_port"]))
                    return "service.port" in (answers_seen[-1][1].get("detail") or "")
                wait_for(names_the_port, proc, err_file)
                assert all(status == 503 for status, _ in answers_seen), answers_seen
            occupant.close()
            wait_for(lambda: answers(ports[setting], tls=setting == "port", ca=emulator_pki.ca_file), proc, err_file)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        finally:
            occupant.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = err_file.read_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if f"{HOST}:{ports[setting]}" in line]
    assert len(lines) == 1 and f"service.{setting}" in lines[0], log[-3000:]


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], err_file: Path,
             within: float = 30) -> None:
    """`waiting.wait_for`, failing at once if serve exits and with its log on a timeout."""
    def alive() -> None:
        if proc.poll() is not None:
            pytest.fail(f"serve exited ({proc.returncode}): {err_file.read_text()[-3000:]}")

    try:
        waiting.wait_for(condition, within, "the condition", every=0.1, alive=alive)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {err_file.read_text()[-3000:]}") from None


def answers(port: int, *, tls: bool, ca: Path) -> bool:
    """GET /healthz is 200 on this port (HTTPS for the API, HTTP for the health listener)."""
    conn: http.client.HTTPConnection
    if tls:
        conn = http.client.HTTPSConnection(HOST, port, context=ssl.create_default_context(cafile=str(ca)), timeout=5)
    else:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


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
        return readyz_answer(port)[0]
    except OSError:  # not listening yet
        return None


def readyz_answer(port: int) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_an_api_that_cannot_start_says_why_once_in_the_log_and_readyz_and_starts_once_fixed(
        hsm: Hsm, token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    """service.tls_key_label names a key with no certificate beside it: one ERROR line saying
    what to fix, /readyz (health port) gives the same reason, and the API starts once the
    certificate is imported, without a restart."""
    label = "api-tls-" + secrets.token_hex(3)
    hsm.generate_keypair(label, KeyAlgorithm.EC_P256)  # a key, no certificate
    api_port, health_port = free_port(), free_port()
    config = serve_config(tmp_path, token_env, emulator_pki, {
        "port": api_port, "health_port": health_port, "tls_key_label": label,
        "tls_cert_file": None, "tls_key_file": None})
    err_file = tmp_path / "serve.err"
    with err_file.open("wb") as err:
        proc = serve(config, token_env, err)
        try:
            answers_seen: list[tuple[int, Any]] = []

            def says_why() -> bool:
                if readyz(health_port) is None:
                    return False
                answers_seen.append(readyz_answer(health_port))
                return "no certificate is stored beside" in (answers_seen[-1][1].get("detail") or "")
            wait_for(says_why, proc, err_file)
            assert answers_seen[-1][0] == 503
            time.sleep(2 * 5.0)  # two more attempts (LISTEN_RETRY): still one ERROR line
            issuer = emulator_pki.intermediate
            now = dt.datetime.now(dt.UTC)
            cert = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string(f"CN={label}"))
                    .issuer_name(issuer.cert.subject).public_key(hsm.public_key(label))
                    .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                    .not_valid_after(now + dt.timedelta(days=1))
                    .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), False)
                    .sign(issuer.key, hashes.SHA256()))
            hsm.import_certificates(label, [cert, issuer.cert])
            wait_for(lambda: answers(api_port, tls=True, ca=emulator_pki.ca_file), proc, err_file)
            wait_for(lambda: readyz(health_port) == 200, proc, err_file)
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
    log = err_file.read_text()
    errors = [line for line in log.splitlines() if "ERROR" in line and "the API cannot start" in line]
    assert len(errors) == 1, log[-3000:]
    assert f"no certificate is stored beside HSM key '{label}'" in errors[0] and "cert import" in errors[0]
    assert "Traceback" not in log
