"""`spyrus-hsm serve` with the API's TLS key in the token (`service.tls_key_label`), as `make run`
and the README set it up, seen through tests/p11shim:

- no PKCS#11 call, pkcs11-provider's included, ever runs on the event loop's thread (the shim
  notes every call made on the process's main thread, where `serve` runs its loop) while new
  leaves connect and ask for tokens;
- a TLS handshake costs no token signature: the shim's signature delay does not reach them;
- while the token is away the API keeps listening: a new leaf gets 503 problem+json with
  Retry-After, /readyz is false; after the replug it is served again by the same process;
- a certificate that cannot issue (an existing deployment's) keeps working as before, and the
  log says what that costs.

These run in the pytest process whose PKCS#11 module is the shim (marker `shim`).
"""

from __future__ import annotations

import http.client
import json
import secrets
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from service_harness import HOST, free_port, serve_config, store_hsm_certificate, wait_for_lines
from waiting import wait_for

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret

pytestmark = [pytest.mark.shim, pytest.mark.timeout(180)]

GUARD = 30.0  # seconds: only so that a module that never gets there fails instead of hanging


class Serve:
    """`serve` in a subprocess: its API port, its health port, its stderr."""

    def __init__(self, proc: subprocess.Popen[bytes], err_file: Path, api_port: int, health_port: int) -> None:
        self.proc, self.err_file, self.api_port, self.health_port = proc, err_file, api_port, health_port

    @property
    def log(self) -> str:
        return self.err_file.read_text()


@pytest.fixture
def shim(token_env: Any, hsm: Hsm, tmp_path: Path) -> Iterator[Callable[..., None]]:
    """Sets the shim's control file, always watching the main thread of every process."""
    thread_log = tmp_path / "main-thread-calls.log"

    def set_shim(**settings: object) -> None:
        token_env.set_shim(watch_thread="main", thread_log=thread_log, **settings)

    set_shim(state="plugged")
    yield set_shim
    token_env.set_shim(state="plugged")
    wait_for(lambda: hsm.state.ready, GUARD, "the HSM ready after the test")


def calls_on_main_thread(tmp_path: Path, pid: int) -> list[str]:
    path = tmp_path / "main-thread-calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in lines if line.endswith(f" {pid}")]


@pytest.fixture
def device(hsm: Hsm) -> str:
    name = "leaf-" + secrets.token_hex(3)
    hsm.import_secret_key(name, Secret(secrets.token_bytes(32)))
    return name


def serve_with_key_in_token(hsm: Hsm, tmp_path: Path, token_env: Any, pki: EmulatorPki, *,
                            issuing: bool) -> tuple[Serve, ssl.SSLContext, str]:
    """`serve` whose TLS key is a new key in the token, certified by the PKI (an issuing
    certificate or a plain server one); with a client context trusting the PKI and a bearer."""
    label = "api-tls-" + secrets.token_hex(3)
    store_hsm_certificate(hsm, label, pki, server_ip=HOST, issuing=issuing)
    bearer = secrets.token_urlsafe(16)
    return (start_serve(tmp_path, token_env, pki, label, bearer),
            ssl.create_default_context(cafile=str(pki.ca_file)), bearer)


def start_serve(tmp_path: Path, token_env: Any, pki: EmulatorPki, label: str, bearer: str) -> Serve:
    config = serve_config(tmp_path, token_env, pki, {
        "port": 0, "health_port": 0, "tls_key_label": label, "tls_cert_file": None, "tls_key_file": None,
        "bearer": {"gateway": bearer},
        "policy": [{"principals": ["gateway"], "operations": ["sas-token"], "devices": ["leaf-*"]}],
        "rate_limit_per_second": 0})
    # health port: one of this test session's (tests/addresses.py)
    raw = json.loads(config.read_text())
    raw["service"]["health_port"] = free_port()
    config.write_text(json.dumps(raw))
    err_file = tmp_path / "serve.err"
    env = token_env.env(SPYRUS_HSM_CONFIG=str(config), OTEL_SDK_DISABLED="true")
    with err_file.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "-v", "serve"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        line = wait_for_lines(proc, ("API on https://",), GUARD)["API on https://"]
    except AssertionError:
        proc.kill()
        proc.wait()
        raise AssertionError(err_file.read_text()[-3000:]) from None
    return Serve(proc, err_file, int(line.rsplit(":", 1)[1]), raw["service"]["health_port"])


def stop(serve: Serve) -> int:
    serve.proc.terminate()
    try:
        return serve.proc.wait(timeout=20)
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()


def ask(serve: Serve, ctx: ssl.SSLContext, bearer: str, device: str) -> tuple[int, dict[str, str], Any]:
    """POST /v1/sas-tokens on a new connection (a new TLS handshake)."""
    conn = http.client.HTTPSConnection(HOST, serve.api_port, context=ctx, timeout=20)
    try:
        conn.request("POST", "/v1/sas-tokens", body=json.dumps({"deviceId": device}),
                     headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    finally:
        conn.close()


def readyz(serve: Serve) -> int:
    conn = http.client.HTTPConnection(HOST, serve.health_port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    finally:
        conn.close()


def test_no_pkcs11_call_runs_on_the_event_loop_thread_while_leaves_connect(
        shim: Callable[..., None], hsm: Hsm, token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki,
        device: str) -> None:
    serve, ctx, bearer = serve_with_key_in_token(hsm, tmp_path, token_env, emulator_pki, issuing=True)
    try:
        statuses = [ask(serve, ctx, bearer, device)[0] for _ in range(12)]  # 12 new connections
        wait_for(lambda: readyz(serve) == 200, GUARD, "/readyz true")
    finally:
        code = stop(serve)
    assert statuses == [200] * 12, serve.log[-3000:]
    assert code == 0, serve.log[-3000:]
    assert calls_on_main_thread(tmp_path, serve.proc.pid) == [], serve.log[-2000:]


def test_a_handshake_costs_no_token_signature_and_the_api_listens_while_the_token_is_away(
        shim: Callable[..., None], hsm: Hsm, token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki,
        device: str) -> None:
    serve, ctx, bearer = serve_with_key_in_token(hsm, tmp_path, token_env, emulator_pki, issuing=True)
    try:
        assert ask(serve, ctx, bearer, device)[0] == 200  # the token is cached from here on
        # A token slower than any handshake could wait for: the handshakes never meet it.
        shim(state="plugged", sign_delay_ms=60_000)
        for _ in range(5):
            status, _, body = ask(serve, ctx, bearer, device)
            assert status == 200, body
        shim(state="unplugged")
        wait_for(lambda: readyz(serve) == 503, GUARD, "/readyz false after the unplug")
        status, headers, body = ask(serve, ctx, bearer, "leaf-new-" + secrets.token_hex(3))
        assert status == 503, body
        assert headers["Content-Type"].startswith("application/problem+json")
        assert int(headers["Retry-After"]) >= 1
        shim(state="plugged")
        wait_for(lambda: readyz(serve) == 200, GUARD, "/readyz true after the replug")
        assert ask(serve, ctx, bearer, device)[0] == 200
        assert serve.proc.poll() is None  # the same process: no restart for the replug
    finally:
        code = stop(serve)
    assert code == 0, serve.log[-3000:]
    assert calls_on_main_thread(tmp_path, serve.proc.pid) == []


def test_a_service_certificate_that_cannot_issue_keeps_working_and_says_what_it_costs(
        shim: Callable[..., None], hsm: Hsm, token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki,
        device: str) -> None:
    serve, ctx, bearer = serve_with_key_in_token(hsm, tmp_path, token_env, emulator_pki, issuing=False)
    try:
        statuses = [ask(serve, ctx, bearer, device)[0] for _ in range(3)]
    finally:
        code = stop(serve)
    assert statuses == [200] * 3
    assert code == 0
    warning = [line for line in serve.log.splitlines() if "cannot issue" in line]
    assert len(warning) == 1 and "token signature" in warning[0] and "path-length-0" in warning[0], serve.log[-3000:]
    # as before: the provider signs each handshake on the loop's thread (what the warning says)
    assert any(line.startswith("C_Sign") for line in calls_on_main_thread(tmp_path, serve.proc.pid))
