"""`spyrus-hsm serve` as the edge runtime starts it (its own process, the edgeHub connection
string in its environment): with the HSM missing or the PIN wrong it stays up, reports
not-ready with the reason, and reports ready once fixed — no crash loop — then exits 0 on
SIGTERM within edgeAgent's 10 s.

A process of its own is needed: PKCS#11 login is per process, and this test process is
already logged in to the token, so a wrong PIN would not be refused here.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from edge_harness import EdgeSite

from spyrus_hsm.hsm import Secret
from spyrus_hsm.hsm.provision import init_token, init_user_pin, list_tokens

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(90)]


def hsm_reported(site: EdgeSite, ready: bool, fragment: str = "") -> dict[str, Any]:
    def matches(r: dict[str, Any]) -> bool:
        hsm = r.get("hsm") or {}
        return hsm.get("ready") is ready and fragment in (hsm.get("reason") or "")

    return site.wait_reported(matches, timeout=40)


def test_wrong_pin_reports_not_ready_then_ready_once_the_pin_file_is_fixed(
        site: EdgeSite, serve: Any, token_env: Any, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("wrong-pin-000\n")
    pin_file.chmod(0o600)
    process = serve(token_env.label, pin_file)

    reported = hsm_reported(site, ready=False, fragment="refused the PIN")
    assert reported["lastError"]["source"] == "hsm" and "PIN" in reported["lastError"]["message"]
    status, body = site.method("listCredentials")
    assert status == 503 and "not ready" in body["error"]
    status, body = site.method("getStatus")
    assert status == 200 and body["hsm"]["ready"] is False
    assert process.alive()

    pin_file.write_text(token_env.pin.decode() + "\n")  # the operator fixes the PIN file
    reported = hsm_reported(site, ready=True)
    assert reported["hsm"]["tokenLabel"] == token_env.label
    assert process.alive()

    assert process.terminate() == 0, process.text()
    text = process.text()
    assert "Traceback" not in text
    for secret in (site.module_key, token_env.pin.decode(), "wrong-pin-000"):
        assert secret not in text


def test_a_missing_token_reports_not_ready_then_ready_once_it_is_created(
        site: EdgeSite, serve: Any, token_env: Any) -> None:
    """Created in two steps, as `token init` (and pkcs11-tool) do: C_InitToken, then
    C_InitPIN. Seen in between, the token has no user PIN yet: that is not a refused PIN,
    and the module must keep trying it."""
    label = "late-" + secrets.token_hex(3)
    process = serve(label, token_env.pin_file)
    hsm_reported(site, ready=False, fragment=f"token with label '{label}' not found")
    so_pin, pin = Secret(token_env.so_pin_file.read_bytes().strip()), Secret(token_env.pin)
    init_token(token_env.module, label, so_pin, None)  # C_InitToken only (PINs never on a command line)
    hsm_reported(site, ready=False, fragment="no user PIN yet")
    init_user_pin(token_env.module, label, so_pin, pin)
    reported = hsm_reported(site, ready=True)
    assert reported["hsm"]["tokenLabel"] == label
    assert site.wait_reported(lambda r: r.get("credentials"))["credentials"]["count"] == 0
    assert process.alive()
    assert process.terminate() == 0, process.text()
    assert site.module_key not in process.text()
    assert token_env.label in [t.label for t in list_tokens(token_env.module)]  # the session's token is untouched


def test_a_half_configured_edge_environment_fails_at_start_naming_what_is_missing(
        site: EdgeSite, token_env: Any, tmp_path: Path) -> None:
    env = token_env.env(EdgeHubConnectionString=site.env["EdgeHubConnectionString"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "modules"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "spyrus_hsm", "serve"], env=env, capture_output=True,
                          timeout=60, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "EdgeModuleCACertificateFile is not set" in err and site.module_key not in err
