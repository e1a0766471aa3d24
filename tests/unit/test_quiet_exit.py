"""`spyrus-hsm serve` stopped by SIGTERM, and an ordinary CLI command, leave nothing on standard
error but their own messages: no "Error in sys.excepthook", no traceback, no "Exception
ignored" from interpreter shutdown (threads, atexit hooks, PKCS#11 or provider finalisation)."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from service_harness import store_hsm_certificate

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm, Secret

pytestmark = pytest.mark.timeout(90)

HOST = "127.0.0.1"
NOISE = ("Error in sys.excepthook", "Original exception was", "Traceback", "Exception ignored")


def _quiet(err: str) -> bool:
    return not any(n in err for n in NOISE)


def _serve_until_listening_then_sigterm(token_env: Any, config: Path, tmp_path: Path) -> tuple[int, str, str]:
    err_file = tmp_path / "serve.err"
    with err_file.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "--config", str(config), "serve"],
                                env=token_env.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        seen = []
        try:
            for raw in proc.stdout:  # bounded by the module's timeout
                seen.append(raw.decode())
                if "API on https://" in seen[-1]:
                    break
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, "".join(seen), err_file.read_text()


def test_serve_with_its_key_in_the_hsm_stops_on_sigterm_without_noise(
        token_env: Any, hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki) -> None:
    """As `make run` serves: the server key in the HSM, so pkcs11-provider is loaded too."""
    label = "quiet-" + secrets.token_hex(3)
    store_hsm_certificate(hsm, label, emulator_pki, server_ip=HOST)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "hsm": {"module": token_env.module, "token_label": token_env.label, "pin_file": str(token_env.pin_file)},
        "state_dir": str(tmp_path / "state"),
        "service": {"host": HOST, "port": 0, "health_port": 0, "tls_key_label": label,
                    "client_ca_file": str(emulator_pki.ca_file)},
    }))
    code, out, err = _serve_until_listening_then_sigterm(token_env, config, tmp_path)
    assert "API on https://" in out, err
    assert code == 0, err
    assert _quiet(err), err


def test_a_cli_command_exits_without_noise(token_env: Any, hsm: Hsm) -> None:
    label = "quiet-" + secrets.token_hex(3)
    hsm.import_secret_key(label, Secret(secrets.token_bytes(32)))
    proc = subprocess.run([sys.executable, "-m", "spyrus_hsm", "sas", "--key", label, "--hub", "h.example",
                           "--device-id", "d1"], env=token_env.env(), capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(b"SharedAccessSignature ")
    assert proc.stderr.decode() == ""


def test_a_loaded_pkcs11_module_still_referenced_at_interpreter_exit_leaves_no_noise(token_env: Any) -> None:
    """Whatever keeps the module's library object to the very end (a test runner's saved
    traceback, a reference cycle) must not make its finalisation print: python-pkcs11's
    lib.__dealloc__ looked up `unload` on a class the interpreter had already torn down, and
    reported the AttributeError through a sys.excepthook that was already gone."""
    script = ("from spyrus_hsm.hsm.library import load_module\n"
              f"KEEP = [load_module({token_env.module!r})]\n"
              "KEEP.append(KEEP)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=token_env.env(), capture_output=True,
                          timeout=60, check=False)
    assert proc.returncode == 0
    assert proc.stderr.decode() == ""
