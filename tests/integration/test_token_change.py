"""A real SoftHSM2 token directory moved away and back, or swapped for another token with the
same label, under a running HSM pool (not the shim: the token directory itself changes).

SoftHSM2 then goes on answering C_GenerateRandom, fails C_GetTokenInfo with GENERAL_ERROR and
finds no objects, and sees the token again only after C_Finalize + C_Initialize. Each scenario
runs in a child process (tests/integration/token_change_child.py) with its own SOFTHSM2_CONF
and token directory, so the session's shared token is never disturbed.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import addresses
import pytest
from waiting import wait_for

from spyrus_hsm.hsm.recovery import restart_done, restart_once

pytestmark = pytest.mark.timeout(120)
CHILD = Path(__file__).with_name("token_change_child.py")
HEALTH_HOST = addresses.host()  # serve's health listener (its API: 127.0.0.1, port 0)


def _conf(root: Path, tokens: Path) -> Path:
    tokens.mkdir(parents=True, exist_ok=True)
    conf = root / f"{tokens.name}.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


def _child(conf: Path, *args: str) -> list[dict[str, Any]]:
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    env.pop("P11SHIM_CONTROL", None)
    proc = subprocess.run([sys.executable, str(CHILD), *args], env=env, capture_output=True, text=True,
                          timeout=100, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _token(root: Path, tokens: Path, key: bytes, *extra: str) -> str:
    key_file = root / f"{tokens.name}.key"
    key_file.write_bytes(key)
    (record,) = _child(_conf(root, tokens), "init", "swap", str(key_file), *extra)
    return str(record["serial"])


def _steps(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["step"]: r for r in records}


def _mac(key: bytes) -> str:
    return hmac.new(key, b"data", hashlib.sha256).hexdigest()


def test_token_directory_moved_away_and_back_recovers_without_a_restart(tmp_path: Path) -> None:
    key = secrets.token_bytes(32)
    serial = _token(tmp_path, tmp_path / "tokens", key)
    s = _steps(_child(tmp_path / "tokens.conf", "moved", str(tmp_path)))
    assert s["sign before"]["value"] == _mac(key)
    # The key found before is gone: a re-scan, not a 404 ("no secret-key object").
    assert s["sign while away"]["ok"] is False and s["sign while away"]["error"] == "TokenChanged"
    assert "was on token 'swap' and is gone" in s["sign while away"]["message"]
    assert s["changed"]["status"] == "degraded" and "is gone" in s["changed"]["reason"]
    assert s["ready again"]["ok"], s["after"]
    assert s["after"]["serial"] == serial and s["after"]["recoveries"] == 1
    assert s["sign after"]["value"] == _mac(key)
    assert s["probe after"]["ok"]


def test_token_swapped_for_another_with_the_same_label_is_read_and_reported(tmp_path: Path) -> None:
    key, spare_key = secrets.token_bytes(32), secrets.token_bytes(32)
    serial = _token(tmp_path, tmp_path / "tokens", key)
    spare_serial = _token(tmp_path, tmp_path / "spare", spare_key)
    assert spare_serial != serial
    s = _steps(_child(tmp_path / "tokens.conf", "swapped", str(tmp_path)))
    assert s["sign before"]["value"] == _mac(key)
    # The probe (what /readyz follows) notices, though C_GenerateRandom still answers.
    assert s["probe while changed"]["ok"] is False and s["probe while changed"]["error"] == "TokenChanged"
    assert "contents unreadable" in s["changed"]["reason"]
    assert s["ready again"]["ok"], s["after"]
    assert s["after"]["serial"] == spare_serial
    assert s["after"]["last_change"] == f"token serial changed from {serial} to {spare_serial}"
    assert s["sign after"]["value"] == _mac(spare_key)
    assert s["probe after"]["ok"]


def test_with_the_provider_on_the_module_a_changed_token_asks_for_a_restart(tmp_path: Path) -> None:
    _token(tmp_path, tmp_path / "tokens", secrets.token_bytes(32))
    s = _steps(_child(tmp_path / "tokens.conf", "shared", str(tmp_path)))
    assert s["probe while changed"]["error"] == "TokenChanged"
    changed = s["changed"]
    assert changed["status"] == "degraded" and changed["restart_required"] is True
    assert "contents unreadable" in changed["reason"] and "needs a restart" in changed["reason"]
    assert "contents unreadable" in changed["last_change"]


def test_a_restart_is_asked_for_once_per_change(tmp_path: Path) -> None:
    assert restart_once(tmp_path, "serial A: token 'swap' contents unreadable")
    assert not restart_once(tmp_path, "serial A: token 'swap' contents unreadable")  # no loop
    assert restart_once(tmp_path, "serial B: token 'swap' contents unreadable")      # a new change
    restart_done(tmp_path)  # ready again: the next change may restart once more
    assert restart_once(tmp_path, "serial B: token 'swap' contents unreadable")


def _serve(root: Path, health_port: int) -> subprocess.Popen[bytes]:
    pin_file = root / "user.pin"
    pin_file.write_bytes(b"pin-token-change")  # the child's PIN (token_change_child.PIN)
    pin_file.chmod(0o600)
    config = {
        "hsm": {"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "swap", "pin_file": str(pin_file)},
        "state_dir": str(root / "state"),
        "service": {"host": "127.0.0.1", "port": 0, "health_host": HEALTH_HOST, "health_port": health_port,
                    "tls_key_label": "api",
                    "bearer_tokens": {"gateway": hashlib.sha256(b"unused").hexdigest()},
                    "policy": [{"principals": ["gateway"], "operations": ["sas-token"], "devices": ["leaf-*"]}]},
    }
    path = root / "serve.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    env = dict(os.environ, SOFTHSM2_CONF=str(root / "tokens.conf"), OTEL_SDK_DISABLED="true")
    env.pop("P11SHIM_CONTROL", None)
    return subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(path), "serve"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_api(proc: subprocess.Popen[bytes]) -> None:
    """Until `serve` says its API listens: the TLS key is in the HSM, so pkcs11-provider holds the
    PKCS#11 module from then on."""
    assert proc.stdout is not None
    end = time.monotonic() + 60
    while time.monotonic() < end:
        line = proc.stdout.readline().decode()
        if not line:
            break
        if "API on https://" in line:
            return
    proc.kill()
    raise AssertionError(f"serve did not start its API: {proc.communicate()[1].decode()[-3000:]}")


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(HEALTH_HOST, port, timeout=10)
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_serve_with_the_tls_key_in_the_hsm_exits_75_once_and_comes_back_after_the_restart(tmp_path: Path) -> None:
    _token(tmp_path, tmp_path / "tokens", secrets.token_bytes(32), "api")
    health = addresses.port(HEALTH_HOST)
    marker = tmp_path / "state" / "hsm-restart"
    proc = _serve(tmp_path, health)
    try:
        _wait_api(proc)
        assert _readyz(health)[0] == 200
        os.rename(tmp_path / "tokens", tmp_path / "tokens.away")
        (tmp_path / "tokens").mkdir()
        code = proc.wait(timeout=60)  # the probe notices; the provider forbids re-initialising
        err = proc.communicate()[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 75, err[-3000:]
    assert "contents unreadable" in err and "needs a restart" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "contents unreadable" in marker.read_text()
    # The runtime restarts the module; the token is back: the new process serves, and forgets
    # the change once the HSM is ready (a later change may restart it once more).
    shutil.rmtree(tmp_path / "tokens")
    os.rename(tmp_path / "tokens.away", tmp_path / "tokens")
    proc = _serve(tmp_path, health)
    try:
        _wait_api(proc)
        status, body = _readyz(health)
        assert status == 200 and body["ready"] is True
        wait_for(lambda: not marker.exists(), 10, "the restart marker removed", every=0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
