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
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spyrus_hsm.hsm.recovery import restart_done, restart_once

pytestmark = pytest.mark.timeout(120)
CHILD = Path(__file__).with_name("token_change_child.py")


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


def _token(root: Path, tokens: Path, key: bytes) -> str:
    key_file = root / f"{tokens.name}.key"
    key_file.write_bytes(key)
    (record,) = _child(_conf(root, tokens), "init", "swap", str(key_file))
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
